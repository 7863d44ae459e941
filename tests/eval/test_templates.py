"""``doc_to_*`` semantics of lm-eval's ConfigurableTask: field names, Jinja templates, digit
targets as indices, literal lists, choice lists from templates."""

from __future__ import annotations

import pytest

from deepwhale.eval import templates

DOC = {"q": "Why?", "opts": {"a": "x", "b": "y"}, "ans": "y", "i": 1, "choices": ["x", "y"]}


def test_fields_templates_and_targets():
    assert templates.doc_to_text("q", DOC) == "Why?"
    assert templates.doc_to_text("Q: {{q}}\n", DOC) == "Q: Why?\n"  # trailing newline kept
    assert templates.doc_to_target("{{i}}", DOC) == 1 and templates.doc_to_target(0, DOC) == 0
    assert templates.doc_to_target("ans", DOC) == "y"
    assert templates.doc_to_target("{{choices}}", DOC) == ["x", "y"]
    assert templates.doc_to_choice("choices", DOC) == ["x", "y"]
    assert templates.doc_to_choice("opts", DOC) == ["x", "y"]  # a dict: its values
    assert templates.doc_to_choice("{{choices}}", DOC) == ["x", "y"]
    assert templates.doc_to_choice(["{{q}} A", "B"], DOC) == ["Why? A", "B"]
    assert templates.render("{{ q | regex_replace('W', 'w') }}", DOC) == "why?"
    assert templates.gold_index("y", ["x", "y"]) == 1 and templates.gold_index([0], ["x"]) == 0


def test_errors():
    with pytest.raises(templates.TemplateError, match="not a list"):
        templates.doc_to_choice("{{q}}", DOC)
    with pytest.raises(templates.TemplateError, match="non-empty list"):
        templates.doc_to_choice("{{ [] }}", DOC)
    with pytest.raises(templates.TemplateError, match="not one of the choices"):
        templates.gold_index("z", ["x", "y"])
    with pytest.raises(templates.TemplateError, match="outside"):
        templates.gold_index(5, ["x", "y"])
    with pytest.raises(templates.TemplateError, match="only one"):
        templates.gold_index([0, 1], ["x", "y"])
