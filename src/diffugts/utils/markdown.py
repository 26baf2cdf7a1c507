"""Text into Markdown that the Kubeflow UI renders: every value that did not come from this
code (header text, prompts, failure reasons, paths) goes through :func:`md`.

KFP's Markdown viewer passes raw HTML through, so ``<script>`` in a value would run there;
Markdown's own syntax (tables, links, emphasis) would let a value rewrite the page.
"""

from __future__ import annotations

import html
import re

# Inline syntax only: values sit in table cells and after list bullets, never at a line start.
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]|~])")


def md(value: object) -> str:
    """``value`` as inert Markdown text on one line: HTML escaped, Markdown syntax backslashed."""
    text = " ".join(str(value).split())
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text, quote=True))
