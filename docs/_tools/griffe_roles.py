"""A griffe extension for the site's API reference: docstrings' roles become links.

The package's docstrings are written for ``help()`` and editors, in reST's inline
style: ``code``, :class:`TaskError`, :func:`~alloter_mp.cancelled`, :meth:`exec`.
mkdocstrings renders docstrings as Markdown, where a role would show as the text
":class:" before the code. This extension (named in ``mkdocs.yml``) rewrites each
role into a cross-reference to the place on the site that documents the name: its
public path (``alloter_mp.TaskError``), not the private module that defines it. A
name the site does not document becomes plain code, so the strict build never meets
a link it cannot resolve. Doctest examples (``>>>``) are put in code blocks.

Only the docs build loads this file; the package never imports it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# The modules whose exported names the reference renders (docs/reference/*.md), and
# the other objects it renders under their own path.
PUBLIC_MODULES = ("alloter_mp", "alloter_mp.ray")
ALSO_RENDERED = ("alloter_mp._executor.Future",)
# An inherited method is documented on every public class that has it; links go to
# the first of these that has it.
PREFERRED = ("alloter_mp.ProcessAlloter",)

ROLE = re.compile(
    r":(?:py:)?(class|func|meth|attr|exc|data|obj|mod):`(~?)([^`]+)`"
)
DOCTEST_OPTION = re.compile(r"\s*#\s*doctest:.*$")


class SphinxRoles(griffe.Extension):
    """Rewrite the roles and doctests of every docstring of ``alloter_mp``."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "alloter_mp":
            return
        public = public_paths(pkg)
        for obj in walk(pkg):
            if obj.docstring is not None:
                text = roles_to_links(obj.docstring.value, obj, public)
                obj.docstring.value = doctests_to_blocks(text)


def walk(obj: griffe.Object) -> list[griffe.Object]:
    """``obj`` and every object it defines (not the names it imports)."""
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found += walk(member)  # type: ignore[arg-type]
    return found


def public_paths(pkg: griffe.Module) -> dict[str, str]:
    """Where the site documents each object: its defining path -> its public path.

    A class's documented members are included, inherited ones too, under every base
    class's path (so that a base class's docstring naming :meth:`exec` finds the
    subclass that has it).
    """
    found: dict[str, str] = {}
    exported: list[tuple[str, griffe.Object | griffe.Alias]] = []
    for module_path in PUBLIC_MODULES:
        module = pkg.modules_collection[module_path]
        for name in module.exports or ():
            exported.append(
                (f"{module_path}.{name}", module.members[str(name)])
            )
    for path in ALSO_RENDERED:
        exported.append((path, pkg.modules_collection[path]))
    exported.sort(key=lambda item: item[0] not in PREFERRED)
    for public, member in exported:
        target = member.final_target if member.is_alias else member
        found.setdefault(target.path, public)
        if not target.is_class:
            continue
        owners = [target.path] + [base.path for base in target.mro()]  # type: ignore[attr-defined]
        for name, attr in target.all_members.items():  # type: ignore[attr-defined]
            real = attr.final_target if attr.is_alias else attr
            if name.startswith("_") or real.docstring is None:
                continue  # the reference does not render it: no anchor to link to
            for owner in owners:
                found.setdefault(f"{owner}.{name}", f"{public}.{name}")
            found.setdefault(real.path, f"{public}.{name}")
    return found


def roles_to_links(
    text: str, obj: griffe.Object, public: dict[str, str]
) -> str:
    """Each ``:role:`name``` in ``text`` as a Markdown link, or as code."""

    def replace(match: re.Match[str]) -> str:
        role, short, name = match.groups()
        name = name.strip()
        shown = name.rsplit(".", 1)[-1] if short else name
        if role in ("func", "meth"):
            shown += "()"
        target = resolve(name, obj, public) if role != "mod" else None
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    return ROLE.sub(replace, text)


def resolve(
    name: str, obj: griffe.Object, public: dict[str, str]
) -> str | None:
    """The public path of ``name`` as seen from ``obj``'s docstring, if documented."""
    name = name.lstrip(".")
    scopes = []
    scope: griffe.Object | None = (
        obj if obj.is_class or obj.is_module else obj.parent
    )
    while scope is not None:
        scopes.append(scope.path)
        scope = scope.parent
    candidates = [f"{s}.{name}" for s in scopes] + ["alloter_mp." + name, name]
    for path in candidates:
        if path in public:
            return public[path]
        try:
            found = obj.modules_collection[path]
        except (
            KeyError,
            ValueError,
            griffe.AliasResolutionError,
            griffe.CyclicAliasError,
        ):
            continue
        real = found.final_target if found.is_alias else found
        # An attribute without a docstring has no anchor: link to its class instead.
        while real is not None and not real.is_module:
            if real.path in public:
                return public[real.path]
            real = real.parent
    return None


def doctests_to_blocks(text: str) -> str:
    """Put each run of doctest lines (``>>>``, ``...`` and their output) in a code block."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(DOCTEST_OPTION.sub("", lines[i]))
            i += 1
        out += ["```pycon", *block, "```"]
    return "\n".join(out)
