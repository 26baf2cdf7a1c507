"""DICOM SR, TID 1500 measurement report (Comprehensive 3D SR) for the lesions.

One "Volumetric ROI measurements" group (TID 1411) per lesion, referencing its SEG segment
and the source series, with tracking id / UID shared with the SEG segment: volume (ml),
longest axial diameter (RECIST long axis, mm) and mean intensity (CT: attenuation
coefficient in [hnsf'U]; MR: signal intensity, no units). A prompt that found no lesion
gets a TID 1501 group saying so (presence of property: absent).
"""

from __future__ import annotations

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes as dicom_codes

from diffugts import __version__
from diffugts.stages.report import codes
from diffugts.stages.report.seg import MANUFACTURER, SegmentInfo, uid

SR_SERIES_NUMBER = 902


def build_sr(
    study,
    sources: list[pydicom.Dataset],
    seg: hd.seg.Segmentation | None,
    infos: list[SegmentInfo],
    lesions: list[dict],
    targets: list[dict],
    model: dict,
    entropy: list[str],
) -> hd.sr.Comprehensive3DSR:
    algorithm = hd.sr.AlgorithmIdentification(
        name="diffugts",
        version=__version__,
        parameters=[f"model={model.get('name', 'unknown')}", f"model_sha256={model.get('sha256', '')}"],
    )
    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid(entropy, "device"),
            name="diffugts",
            manufacturer_name=MANUFACTURER,
            model_name=str(model.get("name", "diffugts"))[:64],
        ),
    )
    by_id = {r["id"]: r for r in lesions}
    groups = [_group(info, by_id[info.lesion_id], targets, seg, algorithm, study) for info in infos]
    found = {info.target_index for info in infos}
    groups += [_absent(n, t, algorithm, entropy) for n, t in enumerate(targets) if n not in found]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,
        referenced_images=None if infos else sources[:1],
    )
    evidence = ([seg] if seg is not None else []) + list(sources)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uid(entropy, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid(entropy, "sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="diffugts lesion measurements",
    )


def _group(info: SegmentInfo, rec: dict, targets: list[dict], seg, algorithm, study):
    prompt = targets[info.target_index]["prompt"]
    site = codes.site_code(prompt.get("organ"))
    measurements = [
        hd.sr.Measurement(name=codes.VOLUME, value=float(rec["volume_ml"]), unit=codes.ML, algorithm_id=algorithm),
        hd.sr.Measurement(
            name=codes.LONG_AXIS, value=float(rec["longest_axial_diameter_mm"]), unit=codes.MM, algorithm_id=algorithm
        ),
    ]
    if "mean_intensity" in rec:
        ct = study.modality == "CT"
        measurements.append(
            hd.sr.Measurement(
                name=codes.ATTENUATION if ct else codes.MR_SIGNAL,
                value=float(rec["mean_intensity"]),
                unit=codes.HU if ct else codes.NO_UNITS,
                derivation=codes.MEAN,
                algorithm_id=algorithm,
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=info.tracking_uid, identifier=info.tracking_id),
        # built directly: from_segmentation fails on a one-segment SEG (highdicom 0.28 looks
        # for per-frame segment ids, which then sit in the shared functional groups)
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=info.segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(study.series["series_instance_uid"]),
        ),
        finding_type=codes.finding_code(prompt["text"]),
        finding_category=codes.MORPHOLOGICALLY_ABNORMAL,
        finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _absent(index: int, target: dict, algorithm, entropy: list[str]):
    """A prompt that found nothing is reported too (TID 1501): finding absent."""
    prompt = target["prompt"]
    site = codes.site_code(prompt.get("organ"))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid(entropy, f"prompt-{index}"), identifier=f"prompt {index}: {prompt['text']}"[:64]
        ),
        finding_type=codes.finding_code(prompt["text"]),
        finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE, codes.ABSENT)],
    )
