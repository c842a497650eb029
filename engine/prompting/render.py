"""A sandboxed prompt renderer: `{{Name}}` placeholders, nothing else.

The whole language is one rule: `{{Name}}`, where Name is a plain identifier (letters, digits, underscore, not
starting with a digit), optionally with spaces inside the braces (`{{ Name }}`), is replaced by the value given
for Name. Everything else is literal text, including single braces (`{"task1": "task1_label"}` in the paper's
multi-task prompts) and `<<News>>`.

Checked when a template is loaded, not when it is rendered:
- anything else inside `{{ ... }}` is an error: attribute or index access (`{{News.__class__}}`, `{{x[0]}}`),
  calls, filters, expressions, an empty `{{}}`;
- a `{{` without its `}}` is an error;
- with `allowed` given, a name outside it is an error (a typo in a template fails at load, not mid-run).

Rendering is one pass over the pieces found at load time: a value is inserted as plain text and never looked at
again, so a document that contains `{{Label}}` or `{{News.__class__}}` stays exactly that text. Values must be
strings (no `str()` of arbitrary objects: nothing calls into a value), and every placeholder must have one.

No torch, no Jinja: this module is imported at queue time and by tests in a bare interpreter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from clfbench.engine.types import ClfbenchError

_OPEN, _CLOSE = "{{", "}}"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateError(ClfbenchError):
    """A template that is not plain `{{Name}}` placeholders and text, or a render with a missing value."""


@dataclass(frozen=True)
class Template:
    """A parsed template: alternating literal text and placeholder names.

    `pieces` holds ("text", literal) and ("var", name) tuples in order; `names` the placeholder names in order
    of first appearance.
    """

    source: str
    pieces: tuple[tuple[str, str], ...]
    names: tuple[str, ...]
    where: str = "template"

    def render(self, values: Mapping[str, str]) -> str:
        missing = [name for name in self.names if name not in values]
        if missing:
            raise TemplateError(f"{self.where}: no value for {', '.join('{{' + n + '}}' for n in missing)}")
        out = []
        for kind, content in self.pieces:
            if kind == "text":
                out.append(content)
            else:
                value = values[content]
                if not isinstance(value, str):
                    raise TemplateError(f"{self.where}: the value of {{{{{content}}}}} must be a string, "
                                        f"got {type(value).__name__}")
                out.append(value)
        return "".join(out)

    def split_at(self, name: str, values: Mapping[str, str]) -> tuple[str, str]:
        """(text before the first `{{name}}`, text after it), the other placeholders rendered with `values`.

        Used to find the part of a prompt that is the same for every example (the text before the document).
        """
        count = sum(1 for kind, content in self.pieces if kind == "var" and content == name)
        if count != 1:
            raise TemplateError(f"{self.where}: {{{{{name}}}}} must appear exactly once, found {count}")
        marker = "\x00"  # refused in templates at load time, and checked in the values here
        if any(isinstance(v, str) and marker in v for v in values.values()):
            raise TemplateError(f"{self.where}: a value contains a NUL character")
        rendered = self.render({**values, name: marker})
        before, _, after = rendered.partition(marker)
        return before, after


def _line_col(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {col}"


def parse_template(source: str, allowed: Iterable[str] | None = None, where: str = "template") -> Template:
    """Parse `source`; raise TemplateError (one line, with the position) on anything but `{{Name}}` placeholders."""
    if not isinstance(source, str):
        raise TemplateError(f"{where}: a template must be text, got {type(source).__name__}")
    if "\x00" in source:
        raise TemplateError(f"{where}: contains a NUL character")
    allowed_set = None if allowed is None else set(allowed)
    pieces: list[tuple[str, str]] = []
    names: list[str] = []
    position = 0
    while True:
        start = source.find(_OPEN, position)
        if start < 0:
            if position < len(source):
                pieces.append(("text", source[position:]))
            break
        end = source.find(_CLOSE, start + 2)
        if end < 0:
            raise TemplateError(f"{where}: '{{{{' at {_line_col(source, start)} is never closed with '}}}}'")
        inner = source[start + 2 : end]
        name = inner.strip()
        if not _NAME.fullmatch(name):
            shown = inner if len(inner) <= 40 else inner[:37] + "..."
            raise TemplateError(
                f"{where}: only plain names are allowed inside {{{{ }}}} (letters, digits, _), "
                f"got {{{{{shown}}}}} at {_line_col(source, start)}"
            )
        if allowed_set is not None and name not in allowed_set:
            known = ", ".join(sorted(allowed_set)) or "none"
            raise TemplateError(f"{where}: unknown variable {{{{{name}}}}} at {_line_col(source, start)} "
                                f"(known here: {known})")
        if start > position:
            pieces.append(("text", source[position:start]))
        pieces.append(("var", name))
        if name not in names:
            names.append(name)
        position = end + 2
    return Template(source=source, pieces=tuple(pieces), names=tuple(names), where=where)


def render(source: str, values: Mapping[str, str], where: str = "template") -> str:
    """Parse and render in one go (the names allowed are exactly the keys of `values`)."""
    return parse_template(source, allowed=values.keys(), where=where).render(values)
