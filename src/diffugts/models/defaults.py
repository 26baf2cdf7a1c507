"""The default model: the demo package shipped inside the library (trained on the phantom
world by `make demo-model`), unless DIFFUGTS_MODEL names another package."""

from __future__ import annotations

import os
from pathlib import Path

from diffugts.errors import ConfigError

DEMO_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "demo"


def default_model() -> str:
    env = os.environ.get("DIFFUGTS_MODEL")
    if env:
        return env
    if not (DEMO_MODEL / "manifest.json").is_file():
        raise ConfigError(f"no default model: {DEMO_MODEL} is missing (run `make demo-model`, or pass --model "
                          "/ set DIFFUGTS_MODEL)")
    return str(DEMO_MODEL)
