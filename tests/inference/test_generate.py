"""Generation on the bundled stories260K model: llama2.c parity, stopping, streaming, limits."""

from __future__ import annotations

import pytest
import torch

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel, generate_text
from deepwhale.inference import DeepSeekModel as ReExported
from deepwhale.inference.generate import PromptTooLongError, stop_holdback
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM

# llama2.c doc/stories260K.md (karpathy/llama2.c): `./run stories260K.bin -z tok512.bin -t 0.0`,
# i.e. greedy from BOS for 256 steps. run.c prints it followed by one newline (566 bytes).
LLAMA2C_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    'She said, "I want to play with your ball, but I can\'t find it."\n'
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to "
    'do."\n'
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" "
    "Her mom said, \"Don't worry, Lily. We can help you."
)


@pytest.fixture(scope="module")
def stories():
    return DeepSeekModel.from_pretrained()


def test_greedy_matches_llama2c_run_c_byte_for_byte(stories):
    out = stories.generate("", max_new_tokens=256, temperature=0)
    assert len((out + "\n").encode()) == 566
    assert out == LLAMA2C_GREEDY


def test_prompt_continuation_and_facade_names(stories):
    assert ReExported is DeepSeekModel
    out = stories.generate("Once upon a time", max_new_tokens=12, temperature=0)
    assert out.startswith(", there was a little girl named Lily.")
    text = generate_text("Once upon a time", max_length=20, model=stories)
    ids = stories.tokenizer.encode("Once upon a time" + text)
    assert len(ids) <= 21 and text.startswith(", there was")  # re-encoding may merge one pair
    with pytest.raises(PromptTooLongError, match="leaves nothing of max_length=3"):
        generate_text("Once upon a time", max_length=3, model=stories)


def test_generate_text_default_model():
    assert generate_text("Once upon a time", max_new_tokens=8).startswith(", there was")


def test_stop_strings_and_finish_reasons(stories):
    chunks = list(
        stories.stream("Once upon a time", max_new_tokens=100, temperature=0, stop=["Lily"])
    )
    text = "".join(c.text for c in chunks)
    assert text == ", there was a little girl named "
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])
    chunks = list(stories.stream("Once upon a time", max_new_tokens=5, temperature=0))
    assert chunks[-1].finish_reason == "length" and len(chunks) == 5
    # a stop string that spans tokens is held back, never half-emitted
    chunks = list(stories.stream("Once", max_new_tokens=60, temperature=0, stop=["girl named"]))
    assert "".join(c.text for c in chunks).endswith("little ")
    assert not any("girl" in c.text for c in chunks)


def test_sampling_seed_is_reproducible(stories):
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=133742)
    a = stories.generate("Once upon a time", **kw)
    assert a == stories.generate("Once upon a time", **kw)
    assert a != stories.generate("Once upon a time", **{**kw, "seed": 1})


def test_eos_ends_generation(stories):
    # with EOS id 2 forced as the most likely token, generation stops at once
    bias = torch.zeros(stories.config.vocab_size)
    bias[2] = 100.0
    stories.module.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        chunks = list(stories.stream("Once", max_new_tokens=10, temperature=0))
    finally:
        stories.module.lm_head._forward_hooks.clear()
    assert [c.finish_reason for c in chunks] == ["stop"] and chunks[0].text == ""


def test_context_limits(stories):
    ctx = stories.config.max_position_embeddings
    long_prompt = "Once upon a time " * 200
    with pytest.raises(PromptTooLongError, match=f"model's context is {ctx} tokens"):
        stories.generate(long_prompt, max_new_tokens=5)
    n = len(stories.tokenizer.encode("Once upon a time " * 100))
    chunks = list(stories.stream("Once upon a time " * 100, max_new_tokens=1000, temperature=0))
    assert len(chunks) == ctx - n and chunks[-1].finish_reason == "length"


def test_stop_holdback():
    assert stop_holdback("abc", ["cde"]) == 1
    assert stop_holdback("abcd", ["cdx", "bcdy"]) == 3
    assert stop_holdback("abc", ["xyz"]) == 0


def test_save_pretrained_round_trip_with_tokenizer(stories, tmp_path):
    stories.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).exists()
    again = DeepSeekModel.from_pretrained(tmp_path)
    assert again.generate("Once", max_new_tokens=20, temperature=0) == stories.generate(
        "Once", max_new_tokens=20, temperature=0
    )


def test_v3_shaped_model_generates_with_real_tokenizer(tmp_path):
    """A random debug-v3 model (MLA + MoE) streams through the same path as a LLaMA."""
    from deepwhale.checkpoint.io import save_model
    from deepwhale.tokenizer import Tokenizer

    model = CausalLM(flavour_config("debug-v3")).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, tmp_path)
    m = DeepSeekModel.from_pretrained(tmp_path)
    assert m.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer.json"):
        m.generate("hi")
    m.tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL)
    chunks = list(m.stream("Once upon a time", max_new_tokens=16, temperature=0.7, seed=0))
    assert len(chunks) == 16 and chunks[-1].finish_reason == "length"
    logits = m(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512)


def test_chat_needs_template(stories):
    from deepwhale.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="no chat template"):
        stories.generate([{"role": "user", "content": "hi"}], max_new_tokens=2)


def test_bad_token_ids_are_rejected(stories):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        stories(torch.tensor([[1, 600]]))
    with pytest.raises(ValueError, match="must be"):
        stories(torch.tensor([1, 2]))
