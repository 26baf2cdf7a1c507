"""Prometheus metrics of the pipeline stages, pushed to a Pushgateway.

Each stage run pushes, into the group ``{job="diffugts", stage=...}``:

- ``diffugts_stage_duration_seconds`` (histogram), ``diffugts_studies_processed_total``,
  ``diffugts_studies_rejected_total{reason}`` (reason from :data:`REASONS`),
  ``diffugts_lesions_found_total`` (counters), ``diffugts_gpu_memory_peak_bytes`` (gauge, 0
  on CPU), ``diffugts_last_success_timestamp_seconds`` (gauge, successful runs only) and
  ``diffugts_build_info{version, model, model_sha256}`` (gauge, 1).

Every push builds a fresh ``CollectorRegistry`` (no global state in the library). A stage
runs in a new pod each time, so to keep counters and the histogram cumulative the group's
current values are read back from the gateway and added to (``accumulate=True``). Two pods
of the same stage pushing in the same instant can lose one increment: the cohort report is
the exact count; these metrics are for dashboards and alerts.

Label values are checked: never a patient name, ID or UID (see ``check_label``). With no
gateway configured (``DIFFUGTS_PUSHGATEWAY_URL`` unset) everything is a no-op. A gateway
that is down costs a warning, never the stage's result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import urllib.request
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, pushadd_to_gateway
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from diffugts import __version__
from diffugts.errors import ConfigError, DiffugtsError
from diffugts.storage.errors import StorageError

log = logging.getLogger(__name__)

JOB = "diffugts"
ENV_GATEWAY = "DIFFUGTS_PUSHGATEWAY_URL"
REASONS = ("bad_input", "no_series", "duplicate", "model_error", "storage", "internal")
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
TIMEOUT_S = 10.0

DURATION = "diffugts_stage_duration_seconds"
PROCESSED = "diffugts_studies_processed"  # exposed with the _total suffix
REJECTED = "diffugts_studies_rejected"
LESIONS = "diffugts_lesions_found"
GPU_PEAK = "diffugts_gpu_memory_peak_bytes"
LAST_SUCCESS = "diffugts_last_success_timestamp_seconds"
BUILD_INFO = "diffugts_build_info"
HELP = {
    DURATION: "Wall-clock duration of a stage run for one study.",
    PROCESSED: "Studies a stage completed.",
    REJECTED: "Studies a stage rejected, by reason.",
    LESIONS: "Lesions found in the studies a stage completed.",
    GPU_PEAK: "Peak GPU memory allocated during the last run of the stage (0 on CPU).",
    LAST_SUCCESS: "Unix time the stage last completed a study.",
    BUILD_INFO: "Software version and model of the last run of the stage.",
}

_STAGE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_SAFE = re.compile(r"^[A-Za-z0-9_.+:-]{0,128}$")
_UID_LIKE = re.compile(r"^\d+(\.\d+){3,}$")  # DICOM UIDs: digits with several dots


def check_label(name: str, value: str) -> str:
    """A label value that cannot carry patient data: short, no spaces or '^' (names), not a
    UID, from a fixed vocabulary where there is one."""
    value = str(value)
    if name == "stage" and not _STAGE.match(value):
        raise ValueError(f"stage label {value!r}: expected a short lower-case name")
    if name == "reason" and value not in REASONS:
        raise ValueError(f"reason label {value!r}: expected one of {', '.join(REASONS)}")
    if not _SAFE.match(value) or _UID_LIKE.match(value):
        raise ValueError(f"label {name}={value!r} refused: could carry an identifier")
    return value


def gateway_url(explicit: str | None = None) -> str | None:
    """The gateway: ``explicit``, else ``$DIFFUGTS_PUSHGATEWAY_URL``; "" means none."""
    url = os.environ.get(ENV_GATEWAY) if explicit is None else explicit
    url = url or None
    if url and not re.match(r"^https?://[^/\s]+/?$", url):
        raise ConfigError(f"{ENV_GATEWAY}: expected http(s)://host:port, got {url!r}")
    return url.rstrip("/") if url else None


def reason_for(exc: BaseException) -> str:
    """The rejection reason of an exception (a fixed set, for the ``reason`` label)."""
    explicit = getattr(exc, "metrics_reason", None)
    if explicit in REASONS:
        return explicit
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, DiffugtsError):
        if re.search(r"\bno (files found|DICOM files|usable CT or MR|series)", str(exc)):
            return "no_series"
        return "bad_input"
    if type(exc).__module__.split(".")[0] in ("torch", "monai", "diffusers", "transformers", "safetensors"):
        return "model_error"
    return "internal"


def gpu_peak_bytes() -> int:
    """Peak GPU memory allocated by torch in this process; 0 without torch or CUDA (torch is
    not imported here: a CPU stage that never loaded it reports 0)."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return 0
        return max(int(torch.cuda.max_memory_allocated(d)) for d in range(torch.cuda.device_count()))
    except Exception:  # a broken CUDA setup must not break the metrics
        return 0


class _Families(Collector):
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def previous_values(gateway: str, job: str, stage: str) -> dict[tuple, float]:
    """{(sample name, sorted labels without job/stage): value} of the group now in the gateway."""
    with urllib.request.urlopen(f"{gateway}/metrics", timeout=TIMEOUT_S) as resp:
        text = resp.read().decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("diffugts_"):
            continue
        for s in family.samples:
            if s.labels.get("job") == job and s.labels.get("stage") == stage:
                labels = tuple(
                    sorted(
                        (k, _le(float(v)) if k == "le" else v)
                        for k, v in s.labels.items()
                        if k not in ("job", "stage", "instance")
                    )
                )
                out[(s.name, labels)] = float(s.value)
    return out


def build_registry(
    stage: str,
    seconds: float,
    *,
    rejected: str | None = None,
    lesions: int | None = None,
    gpu_peak: int | None = None,
    model: dict | None = None,
    previous: dict[tuple, float] | None = None,
    now: float | None = None,
) -> CollectorRegistry:
    """A fresh registry with this run's values added to ``previous`` (see module docstring)."""
    check_label("stage", stage)
    if rejected is not None:
        check_label("reason", rejected)
    prev = previous or {}
    p = lambda name, **labels: prev.get((name, tuple(sorted(labels.items()))), 0.0)  # noqa: E731

    buckets = []
    for bound in (*DURATION_BUCKETS, float("inf")):
        le = _le(bound)
        buckets.append((le, p(f"{DURATION}_bucket", le=le) + (1.0 if seconds <= bound else 0.0)))
    families: list[Metric] = [
        HistogramMetricFamily(
            DURATION, HELP[DURATION], buckets=buckets, sum_value=p(f"{DURATION}_sum") + float(seconds)
        )
    ]
    processed = CounterMetricFamily(PROCESSED, HELP[PROCESSED], value=p(f"{PROCESSED}_total") + (rejected is None))
    rejected_family = CounterMetricFamily(REJECTED, HELP[REJECTED], labels=["reason"])
    for reason in REASONS:  # every reason exported, so rate() sees the first rejection
        rejected_family.add_metric([reason], p(f"{REJECTED}_total", reason=reason) + (reason == rejected))
    found = CounterMetricFamily(LESIONS, HELP[LESIONS], value=p(f"{LESIONS}_total") + int(lesions or 0))
    families += [
        processed,
        rejected_family,
        found,
        GaugeMetricFamily(
            GPU_PEAK, HELP[GPU_PEAK], value=float(gpu_peak if gpu_peak is not None else gpu_peak_bytes())
        ),
    ]
    if rejected is None:
        families.append(GaugeMetricFamily(LAST_SUCCESS, HELP[LAST_SUCCESS], value=now or time.time()))
    if model is None and any(name == BUILD_INFO for name, _ in prev):
        # a run that failed before knowing its model keeps the last known build info
        return _registry(families)
    model = model or {}
    info = GaugeMetricFamily(BUILD_INFO, HELP[BUILD_INFO], labels=["version", "model", "model_sha256"])
    info.add_metric(
        [
            check_label("version", __version__),
            check_label("model", model.get("name", "none")),
            check_label("model_sha256", model.get("sha256", "none")),
        ],
        1.0,
    )
    families.append(info)
    return _registry(families)


def _registry(families) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Families(families))
    return registry


def _le(bound: float) -> str:
    # one spelling of a bucket bound on both sides (the gateway may print 1 or 1.0)
    return "+Inf" if bound == float("inf") else str(float(bound))


def push(registry: CollectorRegistry, stage: str, gateway: str | None = None, job: str = JOB) -> bool:
    """``pushadd`` (POST: replaces only the metrics it carries) into group {job, stage}."""
    url = gateway_url(gateway)
    if url is None:
        log.debug("no Pushgateway configured (%s): metrics not pushed", ENV_GATEWAY)
        return False
    try:
        pushadd_to_gateway(
            url, job=job, registry=registry, grouping_key={"stage": check_label("stage", stage)}, timeout=TIMEOUT_S
        )
    except OSError as err:  # URLError, connection refused, timeouts
        log.warning("metrics not pushed to %s: %s", url, " ".join(str(err).split())[:160])
        return False
    return True


def record_stage(
    stage: str,
    seconds: float,
    *,
    rejected: str | None = None,
    lesions: int | None = None,
    gpu_peak: int | None = None,
    model: dict | None = None,
    gateway: str | None = None,
    job: str = JOB,
    accumulate: bool = True,
) -> bool:
    """Push one stage run (``rejected``: its reason, None when it succeeded). Returns whether
    metrics were pushed; a no-op without a gateway."""
    url = gateway_url(gateway)
    if url is None:
        log.debug("no Pushgateway configured (%s): metrics of stage %s not pushed", ENV_GATEWAY, stage)
        return False
    previous = None
    if accumulate:
        try:
            previous = previous_values(url, job, stage)
        except OSError as err:
            log.warning("metrics not pushed to %s: %s", url, " ".join(str(err).split())[:160])
            return False
    registry = build_registry(
        stage, seconds, rejected=rejected, lesions=lesions, gpu_peak=gpu_peak, model=model, previous=previous
    )
    return push(registry, stage, url, job)


@contextlib.contextmanager
def timed_stage(stage: str, *, model: dict | None = None, gateway: str | None = None, job: str = JOB) -> Iterator[dict]:
    """Time a stage and push its metrics when it ends; the body may set ``run["lesions"]``
    and ``run["model"]``. An exception is recorded as a rejection (``reason_for``) and
    re-raised."""
    run: dict = {"lesions": None, "model": model}
    t0 = time.perf_counter()
    try:
        yield run
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            record_stage(
                stage, time.perf_counter() - t0, rejected=reason_for(exc), model=run["model"], gateway=gateway, job=job
            )
        raise
    record_stage(stage, time.perf_counter() - t0, lesions=run["lesions"], model=run["model"], gateway=gateway, job=job)
