"""Stage 1, ingestion: DICOM (a folder, a zip or an s3:// prefix) -> the study artifact
(diffugts.artifacts.study). The stage's entry points are in :mod:`.stage`; its parts:
``sources`` (listing inputs), ``headers`` (reading and checking headers), ``rules`` (series
selection), ``stacks`` (geometry), ``volume`` (decoding), ``writer``, ``summary``
(docs/ingestion.md)."""

from diffugts.stages.ingest.stage import SCHEMA, IngestResult, LoadedSeries, default_max_voxels, ingest, load_series

__all__ = ["SCHEMA", "IngestResult", "LoadedSeries", "default_max_voxels", "ingest", "load_series"]
