"""The ``diffugts`` command: one sub-command per stage, TotalSegmentator-style.

Each sub-command lives in its own module with ``register(subparsers)``; heavy imports
(torch, highdicom) happen inside the handlers so ``diffugts --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from diffugts import __version__
from diffugts.errors import DiffugtsError

# Sub-command modules, in the order `diffugts --help` lists them.
COMMANDS = ["ingest", "phantom", "models", "attend", "synthesize", "segment", "report", "train", "evaluate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffugts",
        description="Zero-shot, open-vocabulary tumor segmentation on CT and MRI.",
    )
    parser.add_argument("--version", action="version", version=f"diffugts {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"diffugts.cli.{name}").register(sub)
    return parser


def _quiet_libraries(record: logging.LogRecord) -> bool:
    # pydicom below ERROR, and highdicom's INFO lines (which quote UIDs) never reach users.
    if record.name.startswith("pydicom"):
        return record.levelno >= logging.ERROR
    if record.name.startswith("highdicom"):
        return record.levelno >= logging.WARNING
    return True


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    # pydicom logs and warns about every oddity of a file (ingestion reports the ones that
    # matter as one line each) and highdicom logs UIDs: both are dropped unless debugging.
    if not os.environ.get("DIFFUGTS_DEBUG"):
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_libraries)
        warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    try:
        return int(args.func(args) or 0)
    except DiffugtsError as err:
        print(f"diffugts: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("diffugts: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line unless asked for more
        if os.environ.get("DIFFUGTS_DEBUG"):
            raise
        print(
            f"diffugts: internal error: {type(err).__name__}: {one_line(err)} "
            "(set DIFFUGTS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def run() -> None:
    sys.exit(main())
