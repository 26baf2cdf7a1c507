"""Models shipped inside the library, and the default model.

``demo`` (3D, trained on the phantom world by `make demo-model`) is the default unless
DIFFUGTS_MODEL names another package; ``demo-2d`` (the 2D diffusers family, `make
demo-model-2d`) is there to be named: ``--model demo-2d``.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffugts.errors import ConfigError, ParameterError

MODELS_DIR = Path(__file__).resolve().parent.parent / "data" / "models"
DEMO_MODEL = MODELS_DIR / "demo"
DEMO_2D_MODEL = MODELS_DIR / "demo-2d"
SHIPPED = {"demo": DEMO_MODEL, "demo-2d": DEMO_2D_MODEL}


def default_model() -> str:
    env = os.environ.get("DIFFUGTS_MODEL")
    if env:
        return env
    if not (DEMO_MODEL / "manifest.json").is_file():
        raise ParameterError(
            f"no default model: {DEMO_MODEL} is missing (run `make demo-model`, or give a "
            "{model} / set DIFFUGTS_MODEL)",
            "model",
        )
    return str(DEMO_MODEL)


def resolve_model(ref: str) -> str:
    """A shipped model's name (``demo``, ``demo-2d``) -> its folder; anything else unchanged.

    A folder of that name in the working directory wins, so a local package is never shadowed."""
    if ref in SHIPPED and not Path(ref).exists():
        if not (SHIPPED[ref] / "manifest.json").is_file():
            # The container images leave the demo weights out (.dockerignore).
            raise ConfigError(
                f"{ref}: the shipped model is not in this installation ({SHIPPED[ref]} is missing); "
                "give a package folder or s3:// prefix"
            )
        return str(SHIPPED[ref])
    return ref
