"""Stage 5, reporting: DICOM SEG + SR, an optional pseudo-healthy DICOM series, the human
report (Markdown / HTML with pictures), KFP metrics, upload and Prometheus metrics. The
stage's entry points are in :mod:`.stage`; its parts: ``codes`` (SNOMED / DCM / UCUM),
``seg``, ``sr``, ``derived`` (pseudo-healthy series), ``pictures`` + ``human`` (the human
report), ``location``, ``upload``, ``cohort`` (docs/reporting.md). The report folder's layout:
diffugts.artifacts.report."""

from diffugts.stages.report.stage import MARKER, STAGE, cohort_report, make_report, study_key

__all__ = ["MARKER", "STAGE", "cohort_report", "make_report", "study_key"]
