"""Structured output enforced during decoding (llguidance) under continuous batching."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.inference.engine import Engine  # noqa: E402
from deepwhale.inference.guided import GuidedDecoding, GuidedDecodingError  # noqa: E402
from deepwhale.inference.sampling import SamplingParams  # noqa: E402

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "tags": {
                "type": "array",
                "items": {"enum": ["cat", "dog", "bird"]},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["ok", "tags"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4},
]
REGEX = r"[A-Z][a-z]{2,6} (is|was) [0-9]{1,3}"
CHOICES = ["Lily", "Ben", 'the "dog"']


@pytest.fixture(scope="module")
def stories():
    return DeepSeekModel.from_pretrained(device="cpu")


def _params(guided, temperature, seed):
    return SamplingParams(
        temperature=temperature, top_p=0.9, max_new_tokens=120, seed=seed, guided=guided
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mixed_batch_outputs_follow_their_constraints(stories, temperature):
    """Guided (schemas, regex, choice) and unguided requests share one engine batch; every
    guided output parses and validates and finishes with ``stop``; the unguided one equals its
    output when run alone (guidance costs unguided rows nothing)."""
    tok = stories.tokenizer
    prompt = tok.encode("Once upon a time")
    guided = [GuidedDecoding(json=s) for s in SCHEMAS]
    guided += [GuidedDecoding(regex=REGEX), GuidedDecoding(choice=CHOICES)]
    free = SamplingParams(temperature=0, max_new_tokens=20)
    eng = Engine(stories.module, tok, max_batch_size=4, max_seq_len=256)
    alone = eng.generate([prompt], free)[0].texts()[0]
    params = [_params(g, temperature, i) for i, g in enumerate(guided)] + [free]
    reqs = eng.generate([prompt] * len(params), params)
    outs = [r.texts()[0] for r in reqs]
    for schema, text in zip(SCHEMAS, outs, strict=False):
        jsonschema.validate(json.loads(text), schema)
    assert re.fullmatch(REGEX, outs[3]), outs[3]
    assert outs[4] in CHOICES
    assert outs[5] == alone
    assert all(r.sequences[0].finish_reason == "stop" for r in reqs[:5])
    assert sorted(eng.free_slots) == list(range(4)) and not eng.running


def test_n_samples_each_follow_the_grammar(stories):
    tok = stories.tokenizer
    eng = Engine(stories.module, tok, max_batch_size=4, max_seq_len=256)
    req = eng.add_request(tok.encode("Tom"), _params(GuidedDecoding(regex=REGEX), 1.0, 3), n=3)
    while eng.has_work():
        eng.step()
    assert len(req.texts()) == 3 and all(re.fullmatch(REGEX, t) for t in req.texts())


@pytest.mark.parametrize(
    "guided, reason",
    [
        (dict(regex="[a-"), "unclosed"),
        (dict(json={"type": "nonsense"}), "nonsense"),
        (dict(grammar="start: foo"), "foo"),
    ],
)
def test_bad_constraint_raises(stories, guided, reason):
    eng = Engine(stories.module, stories.tokenizer, max_batch_size=2, max_seq_len=64)
    with pytest.raises(GuidedDecodingError, match=reason):
        eng.add_request([1, 2], SamplingParams(guided=GuidedDecoding(**guided)))
    assert not eng.has_work()


@pytest.mark.parametrize(
    "kwargs", [{}, dict(regex="a", choice=["a"]), dict(choice=[]), dict(json="x")]
)
def test_exactly_one_valid_field(kwargs):
    with pytest.raises(GuidedDecodingError):
        GuidedDecoding(**kwargs)


def _sentencepiece_style(metaspace: bool):
    """A tiny LLaMA-2 / DeepSeek-LLM-style tokenizer: strip, collapse spaces, prepend ``▁``
    (in the normalizer, or in a Metaspace pre-tokenizer)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"▁": 0, "2": 1, "▁2": 2, "a": 3, "▁a": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "2"), ("▁", "a")]))
    steps = [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        steps += [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(steps)
    return tok


@pytest.mark.parametrize("metaspace", [False, True])
def test_continuation_tokenizer_keeps_spaces_and_never_prepends(metaspace):
    from tokenizers import Tokenizer

    from deepwhale.inference.guided import continuation_tokenizer_json

    original = _sentencepiece_style(metaspace)
    assert original.encode("2").tokens == ["▁2"]  # prepended: wrong mid-sequence
    assert original.encode("  2").tokens in (["▁2"], ["2"])  # stripped either way
    cont = Tokenizer.from_str(continuation_tokenizer_json(original.to_str()))
    assert cont.encode("2").tokens == ["2"]
    assert cont.encode(" 2").tokens == ["▁2"]
    assert cont.encode("  2").tokens == ["▁", "▁2"]


def test_continuation_tokenizer_leaves_byte_level_bpe_alone():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from deepwhale.inference.guided import continuation_tokenizer_json

    tok = Tokenizer(models.BPE(vocab={"a": 0, "Ġ": 1, "Ġa": 2}, merges=[("Ġ", "a")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert json.loads(continuation_tokenizer_json(tok.to_str())) == json.loads(tok.to_str())
