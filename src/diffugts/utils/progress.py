"""Progress bars for long work (tqdm), on stderr.

Shown on a terminal; in logs (Kubeflow, CI) set ``DIFFUGTS_PROGRESS=1`` to force them or
``0`` to silence them. Library callers can pass ``enable=False``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _forced() -> bool | None:
    value = os.environ.get("DIFFUGTS_PROGRESS", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def progress(items: Iterable[T], desc: str, unit: str = "it", enable: bool = True, total: int | None = None):
    forced = _forced()
    if forced is False or not enable:
        disable = True
    elif forced is True:
        disable = False
    else:
        disable = None  # tqdm: off when stderr is not a terminal
    return tqdm(
        items, desc=desc, unit=unit, disable=disable, total=total, mininterval=0.5, dynamic_ncols=True, leave=False
    )
