"""DICOM UIDs that may name things: result folders and object keys.

A Study Instance UID comes from a file's header, so it is untrusted text until checked: a
value like ``/abs/path`` or ``../../x`` must never become part of a path or an object key.
"""

from __future__ import annotations

import re

from pydicom.uid import RE_VALID_UID

from diffugts.errors import InputError


def checked_uid(uid: object, source: str, what: str = "Study Instance UID") -> str:
    """``uid`` if it is a valid DICOM UID (digits and dots, at most 64 characters), else
    :class:`InputError` naming ``source``; the value itself is not echoed (header text).

    Hand-written around pydicom's pattern: ``UID.is_valid`` uses ``re.match`` with ``$``,
    which lets a trailing newline through.
    """
    text = uid if isinstance(uid, str) else ""
    if len(text) > 64 or not re.fullmatch(RE_VALID_UID, text):
        raise InputError(
            source, f"{what} is not a valid DICOM UID (digits and dots, at most 64 characters); it cannot name a result"
        )
    return text
