"""generate_until pieces against lm-eval 0.4.13's own filter and exact_match code."""

from __future__ import annotations

import random

import pytest
import yaml

from deepwhale.eval import generative
from deepwhale.eval.tasks import TaskError

lm_metrics = pytest.importorskip("lm_eval.api.metrics")
lm_extraction = pytest.importorskip("lm_eval.filters.extraction")
lm_tasks_dir = __import__("pathlib").Path(lm_metrics.__file__).parents[1] / "tasks/gsm8k"

TEXTS = [
    "She has 3 apples. #### 1,234",
    "The answer is $18.\n\nQuestion:",
    "#### -7.5 and then #### 9",
    "no numbers here",
    "",
    "It costs $1,000.00 so 12 - 3 = 9",
    "7",
    "#### 42\n",
]


def _gsm8k_cfg():
    return yaml.safe_load((lm_tasks_dir / "gsm8k.yaml").read_text())


def test_gsm8k_filters_match_lm_eval():
    cfg = _gsm8k_cfg()
    chains = generative.build_filters(cfg["filter_list"], "gsm8k.yaml")
    for (name, steps), entry in zip(chains, cfg["filter_list"], strict=True):
        assert name == entry["name"]
        kw = {k: v for k, v in entry["filter"][0].items() if k != "function"}
        theirs = lm_extraction.RegexFilter(**kw).apply([[t] for t in TEXTS], [{}] * len(TEXTS))
        ours = [generative.apply_chain(steps, [t]) for t in TEXTS]
        assert ours == [r[0] for r in theirs], name


def test_exact_match_matches_lm_eval():
    cfg = _gsm8k_cfg()
    opts = {k: v for k, v in cfg["metric_list"][0].items() if k.startswith(("ignore", "regexes"))}
    rng = random.Random(0)
    refs = ["Natalia sold 48/2 = 24 clips.\n#### 72", "#### 1,000", "#### $5.", "Abc!"]
    preds = ["72", "1000", "5", "abc", "ABC!", "[invalid]", "1,000.", "$5"]
    for _ in range(40):
        p, r = rng.choice(preds), rng.choice(refs)
        for extra in ({}, {"ignore_punctuation": True}, {"ignore_numbers": True}):
            kw = {**opts, **extra}
            theirs = lm_metrics.exact_match_hf_evaluate([p], [r], **kw)["exact_match"]
            assert generative.exact_match(p, r, **kw) == theirs, (p, r, kw)


def test_cut_at_stop_uses_the_earliest_stop():
    until = ["Question:", "</s>", "<|im_end|>"]
    assert generative.cut_at_stop("42</s> x Question: y", until) == "42"
    assert generative.cut_at_stop("a Question: b </s>", until) == "a "
    assert generative.cut_at_stop("no stop", until) == "no stop"


@pytest.mark.parametrize(
    ("filter_list", "message"),
    [
        ({"name": "x"}, "filter_list must be a list"),
        ([{"name": "x"}], r"filter_list\[0\] needs 'name' and 'filter'"),
        (
            [{"name": "x", "filter": [{"function": "lowercase"}]}],
            "unknown filter function 'lowercase'",
        ),
        (
            [{"name": "x", "filter": [{"function": "regex", "regex_pattern": "(a"}]}],
            "does not compile",
        ),
        (
            [{"name": "x", "filter": [{"function": "regex", "pattern": "a"}]}],
            r"unknown regex filter key",
        ),
    ],
)
def test_bad_filter_lists_name_file_and_key(filter_list, message):
    with pytest.raises(TaskError, match=message) as e:
        generative.build_filters(filter_list, "my.yaml")
    assert str(e.value).startswith("my.yaml: ")
