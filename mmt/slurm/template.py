"""A deliberately small template language for the one sbatch template in `slurm/`.

``{{name}}`` inserts a value; ``{{#name}} ... {{/name}}`` keeps its body when the value is truthy (once per item
for a list, where ``{{name}}`` inside is the item); ``{{^name}} ... {{/name}}`` keeps it when falsy. A section
tag alone on its line takes the line with it. Unknown or unused names are errors, so the template and the code
that fills it cannot drift apart silently. Inserted values are never re-read as template text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_STANDALONE = re.compile(r"^[ \t]*(\{\{[#^/]\w+\}\})[ \t]*\n", re.M)
_TAG = re.compile(r"\{\{([#^/]?)(\w+)\}\}")


class TemplateError(ValueError):
    pass


def _parse(template: str, source: str) -> list:
    """Nodes: str (text), ("var", name), ("section", kind, name, children)."""
    text = _STANDALONE.sub(r"\1", template)
    root: list = []
    stack: list[tuple[str, list]] = [("", root)]
    pos = 0
    for m in _TAG.finditer(text):
        stack[-1][1].append(text[pos : m.start()])
        pos = m.end()
        kind, name = m.groups()
        if kind in ("#", "^"):
            children: list = []
            stack[-1][1].append(("section", kind, name, children))
            stack.append((name, children))
        elif kind == "/":
            if stack[-1][0] != name:
                raise TemplateError(f"{source}: {{{{/{name}}}}} closes {stack[-1][0] or 'nothing'!r}")
            stack.pop()
        else:
            stack[-1][1].append(("var", name))
    if len(stack) > 1:
        raise TemplateError(f"{source}: section {stack[-1][0]!r} is never closed")
    root.append(text[pos:])
    bad = re.search(r"\{\{[^}]*\}\}", _TAG.sub("", text))
    if bad:
        raise TemplateError(f"{source}: malformed tag {bad.group(0)!r}")
    return root


def _names(nodes: list) -> set[str]:
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, tuple):
            out.add(node[1] if node[0] == "var" else node[2])
            if node[0] == "section":
                out |= _names(node[3])
    return out


def render(template: str, values: Mapping[str, Any], source: str = "<template>") -> str:
    """Fill ``template`` from ``values``; raise `TemplateError` naming ``source`` for unknown or unused names."""
    tree = _parse(template, source)
    names = _names(tree)
    if names - set(values):
        raise TemplateError(f"{source}: no value for template names {sorted(names - set(values))}")
    if set(values) - names:
        raise TemplateError(f"{source}: values not used by the template: {sorted(set(values) - names)}")

    def emit(nodes: list, scope: Mapping[str, Any], out: list[str]) -> None:
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif node[0] == "var":
                value = scope.get(node[1], values[node[1]])
                if isinstance(value, (bool, list, tuple)) or value is None:
                    raise TemplateError(f"{source}: {{{{{node[1]}}}}} is a flag or a list, not a value")
                out.append(str(value))
            else:
                _, kind, name, children = node
                value = scope.get(name, values[name])
                if kind == "^":
                    if not value:
                        emit(children, scope, out)
                elif isinstance(value, (list, tuple)):
                    for item in value:
                        emit(children, {**scope, name: item}, out)
                elif value:
                    emit(children, scope, out)

    out: list[str] = []
    emit(tree, {}, out)
    return "".join(out)
