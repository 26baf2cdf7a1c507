"""Logging that keeps header text and UIDs out of logs, for the CLI and the Kubeflow components.

pydicom logs (and warns about) the oddities of a file, quoting header values, and logs a
decoder's traceback when pixel data is corrupt; highdicom's INFO lines quote UIDs. Ingestion
reports what matters as one line per file, so these records are dropped unless
``DIFFUGTS_DEBUG`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from diffugts.errors import USER_ERRNOS, DiffugtsError, OutputError


def keep_record(record: logging.LogRecord) -> bool:
    if record.name.startswith("pydicom"):
        return False
    if record.name.startswith("highdicom"):
        return record.levelno >= logging.WARNING
    return True


def install(level: int = logging.INFO) -> None:
    """Root logging to stderr with the filter above (idempotent); pydicom's warnings off."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if os.environ.get("DIFFUGTS_DEBUG"):
        return
    for handler in root.handlers:
        if keep_record not in handler.filters:
            handler.addFilter(keep_record)
    # Libraries may log to their own handlers: stop the records at the source too.
    for name in ("pydicom", "highdicom"):
        logger = logging.getLogger(name)
        if keep_record not in logger.filters:
            logger.addFilter(keep_record)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def masked(text: str, private: tuple[str, ...]) -> str:
    """``text`` with each private string (an input's URI: folder names can be patient names)
    replaced by ``<input>``."""
    for value in sorted({p.rstrip("/") for p in private if p and p.rstrip("/")}, key=len, reverse=True):
        text = text.replace(value, "<input>")
    return text


@contextlib.contextmanager
def component_step(*private: str) -> Iterator[None]:
    """A Kubeflow component's library call: the CLI's log filtering, and a user-facing error
    as one line on stderr (``private`` strings masked) with exit code 2, no traceback."""
    install()
    try:
        yield
    except DiffugtsError as err:
        print(f"diffugts: error: {masked(one_line(err), private)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        print(f"diffugts: error: {masked(one_line(OutputError.from_os('', err)), private)}", file=sys.stderr)
        sys.exit(2)
