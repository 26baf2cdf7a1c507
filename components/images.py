"""Container images the components run in (built from ``images/``).

Override at compile time with ``DIFFUGTS_CPU_IMAGE`` / ``DIFFUGTS_GPU_IMAGE`` to point at a
private registry; the values are baked into the compiled pipeline YAML.
"""

import os

VERSION = "0.1.0"
CPU_IMAGE = os.environ.get("DIFFUGTS_CPU_IMAGE", f"ghcr.io/diffugts/diffugts-cpu:{VERSION}")
GPU_IMAGE = os.environ.get("DIFFUGTS_GPU_IMAGE", f"ghcr.io/diffugts/diffugts-cuda:{VERSION}")
