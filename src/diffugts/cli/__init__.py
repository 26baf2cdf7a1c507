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

from diffugts import __version__
from diffugts.errors import USER_ERRNOS, DiffugtsError, OutputError, ParameterError
from diffugts.utils import atomic, logs

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


one_line = logs.one_line
# Library parameters whose flag is not "--" + the name with dashes (ParameterError messages
# name parameters; the CLI shows its flags).
FLAGS = {"prompts": "--prompt", "datasets": "--dataset", "mappings": "--mapping", "model": "--model"}


def flag(parameter: str) -> str:
    return FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


def message(err: DiffugtsError) -> str:
    """The one line shown for ``err``: a parameter error speaks of the flags."""
    if isinstance(err, ParameterError):
        return one_line(err.render({p: flag(p) for p in err.parameters}))
    return one_line(err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    # pydicom's records quote header text (and a decoder's traceback), highdicom's UIDs.
    logs.install()
    try:
        if getattr(args, "out", None):
            atomic.check_output_path(args.out)
        return int(args.func(args) or 0)
    except DiffugtsError as err:
        print(f"diffugts: error: {message(err)}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            return _internal(err)
        # The environment, not a bug: a full disk, a read-only or missing folder.
        print(f"diffugts: error: {one_line(OutputError.from_os(getattr(args, 'out', '') or '', err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffugts: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line unless asked for more
        return _internal(err)


def _internal(err: Exception) -> int:
    if os.environ.get("DIFFUGTS_DEBUG"):
        raise err
    print(
        f"diffugts: internal error: {type(err).__name__}: {one_line(err)} (set DIFFUGTS_DEBUG=1 for the traceback)",
        file=sys.stderr,
    )
    return 1


def run() -> None:
    sys.exit(main())
