"""A griffe extension for the docs build: Sphinx-style roles in docstrings become cross-references.

kvpress-mm docstrings name other objects the Sphinx way (``:class:`~kvpress_mm.Compressor```,
``:meth:`to_config```). mkdocstrings renders Markdown, where such a role would print literally;
this extension rewrites each role into an autorefs cross-reference (``[`Compressor`][path]``)
before rendering. Relative names are looked up the way a reader would: the object's own
members, then its parents' (class, module, package). A target that cannot be found is still
written as a cross-reference, so ``mkdocs build --strict`` fails on it instead of printing
dead text.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :role:`name`, :role:`~dotted.name`, :role:`title <dotted.name>`
ROLE = re.compile(
    r":(?:py:)?(?:class|meth|func|attr|mod|exc|data|obj|const):`(~?)([^`<]+?)(?:\(\))?(?:\s*<([\w.]+)>)?`"
)


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path ``name`` refers to from ``obj``'s docstring."""
    if name.startswith("kvpress_mm"):
        return name
    head, _, rest = name.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        member = scope.members.get(head)
        if member is not None:
            path = member.target_path if isinstance(member, griffe.Alias) else member.path
            return f"{path}.{rest}" if rest else path
        scope = scope.parent
    return name


def _rewrite(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        short, text, explicit = match.group(1) == "~", match.group(2).strip(), match.group(3)
        if explicit is not None:
            return f"[`{text}`][{_resolve(obj, explicit)}]"
        title = text.rsplit(".", 1)[-1] if short else text
        return f"[`{title}`][{_resolve(obj, text)}]"

    return ROLE.sub(replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring of the package into a cross-reference."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Walk the loaded package once it is complete (so every relative name can be found)."""
        self._walk(pkg, seen=set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj, obj.docstring.value)
        for member in obj.members.values():
            if not isinstance(member, griffe.Alias):
                self._walk(member, seen)
