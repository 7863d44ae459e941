"""The engine: continuous batching identity, n samples, logprobs, cancellation, chunked prefill."""

from __future__ import annotations

import threading

import pytest
import torch

from deepwhale.api import DeepSeekModel
from deepwhale.inference.engine import Engine
from deepwhale.inference.generate import PromptTooLongError, generate_stream
from deepwhale.inference.sampling import SamplingParams
from deepwhale.model.cache import cache_bytes_per_token, make_cache
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM

TEXTS = [
    "Once",
    "Once upon a time there was a dog",
    "The cat sat on the mat and then " * 5,
    "Lily and Ben went to the park. " * 12,
    "Tom",
]


@pytest.fixture(scope="module")
def stories():
    return DeepSeekModel.from_pretrained()


def _alone(model, ids, params):
    return "".join(c.text for c in generate_stream(model.module, model.tokenizer, ids, params))


@pytest.mark.parametrize("batch", [5, 2])
def test_greedy_batched_equals_alone(stories, batch):
    """Prompts of 2 to 145 tokens, run together (batch 5) or joining as slots free (batch 2)."""
    prompts = [stories.tokenizer.encode(t) for t in TEXTS]
    budgets = [40, 25, 40, 10, 33]
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in budgets]
    alone = [_alone(stories, p, sp) for p, sp in zip(prompts, params, strict=True)]
    eng = Engine(stories.module, stories.tokenizer, max_batch_size=batch, max_seq_len=256)
    reqs = eng.generate(prompts, params)
    assert [r.texts()[0] for r in reqs] == alone
    assert [len(r.sequences[0].output_ids) for r in reqs] == budgets
    assert sorted(eng.free_slots) == list(range(batch)) and not eng.running


def test_greedy_batched_equals_alone_mla_moe(tmp_path, stories):
    """The same identity for a DeepSeek-V3-shaped model (absorbed MLA decode, MoE routing)."""
    model = CausalLM(flavour_config("debug-v3")).eval()
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(1))
    m = DeepSeekModel(model, stories.tokenizer)
    prompts = [stories.tokenizer.encode(t) for t in TEXTS]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    alone = [_alone(m, p, params) for p in prompts]
    m.set_batch_size(3, max_seq_len=256)
    assert m.generate_batch(TEXTS, temperature=0, max_new_tokens=24) == alone


def test_greedy_batched_equals_alone_sparse_attention(stories):
    """DeepSeek-V3.2 (debug-v32: the indexer keeps 16 tokens of prompts up to 145): batched,
    padded and chunk-prefilled decode equals each sequence alone, and a forked prompt too."""
    model = CausalLM(flavour_config("debug-v32")).eval()
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(1))
    m = DeepSeekModel(model, stories.tokenizer)
    prompts = [stories.tokenizer.encode(t) for t in TEXTS]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    alone = [_alone(m, p, params) for p in prompts]
    eng = Engine(model, stories.tokenizer, max_batch_size=2, max_seq_len=256, prefill_chunk=40)
    assert [r.texts()[0] for r in eng.generate(prompts, params)] == alone
    m.set_batch_size(3, max_seq_len=256)
    assert m.generate_batch(TEXTS, temperature=0, max_new_tokens=24) == alone
    req = eng.add_request(prompts[2], params, n=2)  # the prompt's cache rows are forked
    while eng.has_work():
        eng.step()
    assert req.texts() == [alone[2], alone[2]]


def test_n_samples_fork_the_prompt_and_match_seeded_single_runs(stories):
    ids = stories.tokenizer.encode("Once upon a time")
    eng = Engine(stories.module, stories.tokenizer, max_batch_size=4, max_seq_len=128)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=10, max_new_tokens=20)
    req = eng.add_request(ids, params, n=3)
    while eng.has_work():
        eng.step()
    texts = req.texts()
    assert eng.stats["prompt_tokens"] == len(ids)  # one prefill for three samples
    for i, text in enumerate(texts):
        single = SamplingParams(temperature=1.0, top_p=0.9, seed=10 + i, max_new_tokens=20)
        assert text == _alone(stories, ids, single)
    assert len(set(texts)) > 1


def test_logprobs(stories):
    ids = stories.tokenizer.encode("Once upon a time")
    eng = Engine(stories.module, stories.tokenizer, max_batch_size=2, max_seq_len=64)
    req = eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=3), logprobs=5)
    chunks = []
    while eng.has_work():
        chunks += [c for r, _, c in eng.step() if r is req]
    with torch.no_grad():
        logits = stories.module(torch.tensor([ids]))[0, -1]
    expected = torch.log_softmax(logits, -1)
    first = chunks[0].logprobs
    assert first.token_id == int(logits.argmax())
    assert abs(first.logprob - float(expected.max())) < 1e-5
    assert [t for t, _ in first.top] == expected.topk(5).indices.tolist()
    assert all(a >= b for (_, a), (_, b) in zip(first.top, first.top[1:], strict=False))
    assert len(req.sequences[0].logprobs) == 3


def test_stop_strings_and_finish_reasons(stories):
    ids = stories.tokenizer.encode("Once upon a time")
    eng = Engine(stories.module, stories.tokenizer, max_batch_size=2, max_seq_len=64)
    a = eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=50, stop=["Lily"]))
    b = eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=4))
    while eng.has_work():
        eng.step()
    assert a.texts()[0] == ", there was a little girl named "
    assert a.sequences[0].finish_reason == "stop" and b.sequences[0].finish_reason == "length"
    # the slot's context bounds generation too
    long_ids = stories.tokenizer.encode("Once upon a time " * 14)[:60]
    c = eng.add_request(long_ids, SamplingParams(temperature=0, max_new_tokens=50))
    while eng.has_work():
        eng.step()
    assert len(long_ids) + len(c.sequences[0].output_ids) == 64
    assert c.sequences[0].finish_reason == "length"


def test_cancel_frees_the_slot_and_others_continue(stories):
    ids = stories.tokenizer.encode("Once upon a time")
    eng = Engine(stories.module, stories.tokenizer, max_batch_size=1, max_seq_len=512)
    eng.start()
    try:
        long = eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=400))
        waiting = eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=5))
        stream = iter(long)
        next(stream)  # the first request is running and holds the only slot
        eng.cancel(long)
        rest = list(stream)
        assert rest[-1][1].finish_reason == "cancelled"
        assert len(long.sequences[0].output_ids) < 400
        done = threading.Event()
        out = []

        def consume():
            out.extend(waiting)
            done.set()

        threading.Thread(target=consume, daemon=True).start()
        assert done.wait(60)
        assert out[-1][1].finish_reason == "length"
        assert waiting.texts()[0].startswith(", there was")
    finally:
        eng.shutdown()
    assert eng.free_slots == [0]


def test_bad_requests(stories):
    eng = Engine(stories.module, stories.tokenizer, max_batch_size=2, max_seq_len=32)
    with pytest.raises(PromptTooLongError, match="empty"):
        eng.add_request([])
    with pytest.raises(PromptTooLongError, match="engine's context is 32 tokens"):
        eng.add_request([5] * 40)
    with pytest.raises(ValueError, match="n must be in 1..2"):
        eng.add_request([5], n=3)
    with pytest.raises(ValueError, match="logprobs must be in 0..20"):
        eng.add_request([5], logprobs=21)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 512\)"):
        eng.add_request([5, 9999])
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(stories.module, stories.tokenizer, max_batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        stories.set_batch_size(0)


@pytest.mark.parametrize("flavour", ["debug-v3", "debug-llama"])
def test_chunked_prefill_matches_one_pass(flavour):
    model = CausalLM(flavour_config(flavour)).eval()
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))
    eng = Engine(model, None, max_batch_size=2, max_seq_len=512, prefill_chunk=64)
    chunked = eng._prefill(ids, slot=1)
    with torch.no_grad():
        full = model(ids[None])[0, -1]
    assert (chunked - full).abs().max().item() <= 1e-4


def test_long_context_prefill_16k_on_debug_model():
    """16K tokens through the chunked prefill of the debug DeepSeek-V3 model, then decode."""
    config = flavour_config("debug-v3", num_hidden_layers=2)
    model = CausalLM(config).eval()
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(3))
    n = 16 * 1024
    ids = torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(1))
    eng = Engine(model, None, max_batch_size=1, max_seq_len=n + 8, prefill_chunk=1024)
    logits = eng._prefill(ids, slot=0)
    assert logits.shape == (512,) and torch.isfinite(logits).all()
    eng.lengths[0] = n
    with torch.no_grad():
        nxt = eng._decode_forward(logits.argmax().view(1, 1), torch.tensor([[n]]))
    assert torch.isfinite(nxt).all()
    # the latent cache is what the MLA layers hold: kv_lora_rank + rope dims per token
    assert eng.caches[0].a.shape == (1, n + 8, config.kv_lora_rank)


def test_cache_bytes_per_token():
    v3 = flavour_config("debug-v3")
    got = cache_bytes_per_token(v3, dtype_bytes=2)
    assert got["cache"] == (32 + 8) * 3 * 2
    assert got["mha"] == 4 * (24 + 16) * 3 * 2
    llama = flavour_config("debug-llama")
    assert cache_bytes_per_token(llama)["cache"] == 2 * 4 * 8 * 2 * 2
    caches = make_cache(v3, batch=2, max_seq_len=10)
    assert sum(c.nbytes() for c in caches) == 2 * 10 * got["cache"] * 2  # fp32 = 2x bf16


def test_compiled_decode_matches_eager(stories):
    """model.compile() wraps the decode step in torch.compile; output is unchanged."""
    m = DeepSeekModel(stories.module, stories.tokenizer)
    m.set_batch_size(2, max_seq_len=64)
    eager = m.generate_batch(["Once upon a time", "Tom"], temperature=0, max_new_tokens=8)
    m.compile()
    assert m.generate_batch(["Once upon a time", "Tom"], temperature=0, max_new_tokens=8) == eager


def test_a_rebuilt_engine_keeps_the_compile_mode(stories, monkeypatch):
    """set_batch_size rebuilds the engine; compile()'s mode reaches the new one."""
    seen = []
    monkeypatch.setattr(Engine, "compile_decode", lambda self, *a, **kw: seen.append((a, kw)))
    m = DeepSeekModel(stories.module, stories.tokenizer)
    m.compile(mode="max-autotune-no-cudagraphs")
    m.set_batch_size(3, max_seq_len=32)
    assert m.engine.max_batch_size == 3
    assert seen == [((), {"mode": "max-autotune-no-cudagraphs"})]


def test_cache_rows_are_views_of_the_slot():
    """The engine prefills a slot through ``rows(slot, slot + 1)``: writes land in that row."""
    cache = make_cache(flavour_config("debug-v3"), batch=3, max_seq_len=4)[0]
    view = cache.rows(2, 3)
    pos = torch.tensor([[0, 1]])
    view.update(
        pos, torch.ones(1, 2, cache.a.shape[-1]), torch.full((1, 2, cache.b.shape[-1]), 2.0)
    )
    assert torch.all(cache.a[2, :2] == 1) and torch.all(cache.b[2, :2] == 2)
    assert not cache.a[:2].any() and not cache.a[2, 2:].any()
    with pytest.raises(ValueError, match="not within the cache's 3 rows"):
        cache.rows(2, 4)


def test_tensorrt_says_what_is_missing(stories):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        stories.enable_tensorrt(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        stories.enable_tensorrt(precision="int4")


def test_a_failing_request_fails_alone_and_the_engine_stays_usable(stories):
    """A sampling error fails only its own request; a model-wide error leaves no slot taken."""
    from deepwhale.inference.engine import SamplingError

    class Flaky(Engine):
        def _sample(self, req, seq):
            if req.request_id == "bad":
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
            return super()._sample(req, seq)

    ids = stories.tokenizer.encode("Once upon a time")
    eng = Flaky(stories.module, stories.tokenizer, max_batch_size=2, max_seq_len=64)
    good = eng.add_request(ids, SamplingParams(temperature=0.5, seed=1, max_new_tokens=8))
    bad = eng.add_request(
        ids, SamplingParams(temperature=0.5, seed=2, max_new_tokens=8), request_id="bad"
    )
    while eng.has_work():
        eng.step()
    assert len(good.sequences[0].output_ids) == 8 and good.texts()[0]
    with pytest.raises(SamplingError, match="sampling failed"):
        bad.texts()
    assert sorted(eng.free_slots) == [0, 1] and not eng.running

    class Broken(Engine):
        def _decode_forward(self, tokens, positions):
            raise FloatingPointError("NaN logits")

    eng = Broken(stories.module, stories.tokenizer, max_batch_size=2, max_seq_len=64)
    with pytest.raises(FloatingPointError):
        eng.generate([ids, ids], SamplingParams(temperature=0, max_new_tokens=4))
    assert sorted(eng.free_slots) == [0, 1] and not eng.running and not eng.waiting


def test_submit_starts_the_engine_and_generate_works_alongside(stories):
    m = DeepSeekModel(stories.module, stories.tokenizer)
    m.set_batch_size(4, max_seq_len=64)
    try:
        req = m.submit("Once upon a time", n=2, temperature=0.8, seed=1, max_new_tokens=5)
        chunks = list(req)
        assert [c.finish_reason for _, c in chunks if c.finish_reason] == ["length", "length"]
        # the synchronous helpers keep working while the loop runs
        assert m.generate_batch(["Once upon a time"], temperature=0, max_new_tokens=6)[
            0
        ].startswith(", there was")
        with pytest.raises(ValueError, match="seed must be below"):
            m.submit("Once", n=2, seed=2**64 - 1)
    finally:
        m.engine.shutdown()


def test_submit_takes_one_typed_sampling_params_or_its_fields_as_keywords(stories):
    """``submit(prompt, params)`` and ``submit(prompt, **fields)`` queue the same request; the
    engine request holds the very SamplingParams given (validated once, never rebuilt)."""
    m = DeepSeekModel(stories.module, stories.tokenizer)
    m.set_batch_size(4, max_seq_len=64)
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=6)
    try:
        typed = m.submit("Once upon a time", params, n=2, logprobs=1)
        assert typed.params is params and typed.n == 2 and typed.logprobs == 1
        keywords = m.submit(
            "Once upon a time", n=2, logprobs=1, temperature=0.8, seed=3, max_new_tokens=6
        )
        list(typed), list(keywords)  # wait for both
        assert typed.texts() == keywords.texts() and typed.texts()[0] != typed.texts()[1]
        with pytest.raises(TypeError, match="not both"):
            m.submit("Once", params, temperature=0.5)
        with pytest.raises(TypeError, match="params must be a SamplingParams"):
            m.submit("Once", 2)  # n by position, as before params existed
    finally:
        m.engine.shutdown()


def test_generate_stream_and_batch_take_params_too(stories):
    """``generate`` / ``stream`` / ``generate_batch`` take the same typed SamplingParams as
    ``submit``, with the same answers as its fields given as keywords."""
    m = DeepSeekModel(stories.module, stories.tokenizer)
    m.set_batch_size(2, max_seq_len=64)
    params = SamplingParams(temperature=0.7, seed=5, max_new_tokens=7)
    fields = dict(temperature=0.7, seed=5, max_new_tokens=7)
    assert m.generate("Once upon a time", params) == m.generate("Once upon a time", **fields)
    streamed = "".join(c.text for c in m.stream("Tom", params))
    assert streamed == m.generate("Tom", **fields)
    prompts = ["Once upon a time", "Tom"]
    assert m.generate_batch(prompts, params) == m.generate_batch(prompts, **fields)
    with pytest.raises(TypeError, match="not both"):
        m.generate("Once", params, max_new_tokens=3)
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        m.generate_batch(prompts, 3)


def test_on_output_sink_gets_backlog_then_live_items_then_none():
    """``Request.on_output`` delivers what was queued before it was set, then the rest, then
    ``None``; the result equals the iterator's."""
    model = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(2, 64)
    eng = model.engine
    ids = model.encode_prompt("Once upon a time")
    want = eng.generate([ids], SamplingParams(temperature=0, max_new_tokens=8))[0].texts()[0]
    req = eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=8))
    eng.step()  # prefill + first token land in the queue before the sink exists
    got = []
    req.on_output(got.append)
    while not req.finished:
        eng.step()
    assert got[-1] is None and all(isinstance(x, tuple) for x in got[:-1])
    assert "".join(chunk.text for _, chunk in got[:-1]) == want
