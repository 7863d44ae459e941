"""``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` with lm-eval 0.4.x semantics
(``ConfigurableTask.doc_to_*`` and ``lm_eval.utils.apply_template``):

* a string that is a key of the document selects that field;
* any other string is a Jinja template (``StrictUndefined``, trailing newline kept);
* a rendered target that is all digits becomes an ``int`` (an index into the choices), a
  rendered ``[...]`` a Python literal; a rendered choice list is a Python literal
  (``"{{choices.text}}"`` renders ``['a', 'b']``);
* ``doc_to_choice`` may also be a YAML list of templates.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A template failed to render or gave an unusable value (the message names where)."""


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, string, count=count)


_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = _regex_replace
_CACHE: dict[str, jinja2.Template] = {}


def compile_template(source: str) -> jinja2.Template:
    """Parse ``source`` once (cached). Raises ``jinja2.TemplateSyntaxError`` on bad syntax."""
    template = _CACHE.get(source)
    if template is None:
        template = _CACHE[source] = _ENV.from_string(source)
    return template


def render(source: str, doc: dict) -> str:
    """Render one template against a document's fields."""
    return compile_template(source).render(**doc)


def doc_to_text(spec: str, doc: dict) -> str:
    """The prompt text of ``doc``."""
    if spec in doc:
        return str(doc[spec])
    return render(spec, doc)


def doc_to_target(spec: str | int, doc: dict) -> int | str | list:
    """The target: an int index for multiple choice, else text (or a literal list)."""
    if isinstance(spec, int):
        return spec
    if spec in doc:
        value = doc[spec]
    else:
        value = render(spec, doc)
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        if len(value) >= 2 and value[0] == "[" and value[-1] == "]":
            return ast.literal_eval(value)
    return value


def doc_to_choice(spec: str | list, doc: dict) -> list[str]:
    """The answer choices (strings) of ``doc``."""
    if isinstance(spec, list):
        return [render(s, doc) if isinstance(s, str) else str(s) for s in spec]
    if spec in doc:
        value: Any = doc[spec]
    else:
        text = render(spec, doc)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise TemplateError(f"doc_to_choice rendered {text[:80]!r}, not a list") from e
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, (list, tuple)) or not value:
        raise TemplateError(f"doc_to_choice gave {type(value).__name__}, not a non-empty list")
    return [str(c) for c in value]


def gold_index(target: int | str | list, choices: list[str]) -> int:
    """The gold choice index: an int as is, a string by its position in ``choices``.

    Raises:
        TemplateError: the index is out of range or the string is not one of the choices.
    """
    if isinstance(target, list):
        if len(target) != 1:
            raise TemplateError(f"{len(target)} gold targets; only one is supported")
        target = target[0]
    if isinstance(target, str):
        if target not in choices:
            raise TemplateError(f"target {target!r} is not one of the choices {choices}")
        return choices.index(target)
    if not 0 <= int(target) < len(choices):
        raise TemplateError(f"target index {target} outside the {len(choices)} choices")
    return int(target)
