"""User-facing errors.

Anything raised as a :class:`DiffugtsError` is bad input or a bad environment, not a
bug: the CLI prints its message as one line and exits with code 2, no traceback.
"""

from __future__ import annotations

import errno
import os

# OSErrors that are the environment's doing (space, permissions, paths), not bugs: shown as
# one line with exit code 2.
USER_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.EISDIR,
        errno.ENAMETOOLONG,
    }
)


class DiffugtsError(Exception):
    """An error the user can fix; ``str(err)`` is the one line shown to them."""

    exit_code = 2


class InputError(DiffugtsError):
    """Bad input, naming the file (or folder / URI) and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(DiffugtsError):
    """A bad setting: missing credentials, malformed rules, unknown option."""


class ParameterError(ConfigError):
    """A bad parameter value. The message names parameters as ``{name}`` fields: the library
    shows the parameter's own name, the CLI its flag (``diffugts.cli.FLAGS``)."""

    def __init__(self, template: str, *parameters: str):
        self.template = template
        self.parameters = parameters
        super().__init__(self.render())

    def render(self, names: dict[str, str] | None = None) -> str:
        names = names or {}
        text = self.template
        for p in self.parameters:  # not str.format: a path in the message may hold braces
            text = text.replace("{" + p + "}", names.get(p, p))
        return text


class OutputError(DiffugtsError):
    """An output that cannot be written: disk full, read-only, not a folder, a path that is
    not UTF-8. A storage failure (metrics reason ``storage``), not bad input."""

    metrics_reason = "storage"

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fsdecode(path)
        self.reason = f"cannot write ({reason})"
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)

    @classmethod
    def from_os(cls, path: str | os.PathLike, err: OSError) -> OutputError:
        return cls(getattr(err, "filename", None) or path, err.strerror or " ".join(str(err).split()))
