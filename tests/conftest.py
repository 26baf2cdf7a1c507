"""Shared fixtures. Services the tests need run for real on loopback, started here."""

# The pipelines first, before any test module loads torch & co.: kfp traces each pipeline at
# import and calls inspect.stack() per task, whose cost grows with the number of loaded modules
# (about 2 s of CPU here, 15 to 20 s once torch, MONAI and diffusers are loaded).
import pipelines.compile  # noqa: F401
from pushgateway import pushgateway_url  # noqa: F401
from s3server import s3_env, s3_server  # noqa: F401  (pytest finds fixtures by name)
