"""``deepwhale`` as an lm-eval 0.4.x model: ``lm_eval.simple_evaluate(model="deepwhale", ...)``.

Importing this module registers the name (lm-eval has no entry-point discovery for models)::

    import deepwhale.eval.lm_eval_model  # noqa: F401
    lm_eval.simple_evaluate(model="deepwhale", model_args="pretrained=DIR", tasks=["arc_easy"])

``model_args``: ``pretrained`` (folder or repo id; default the bundled stories260K), ``dtype``,
``device``, ``batch_size``, ``ppl_stride`` (see :mod:`deepwhale.eval.windows`; 1 =
lm-eval's ``context_len=1``). Tokenization is :class:`lm_eval.api.model.TemplateLM`'s own
(``_encode_pair``); the scores come from :func:`deepwhale.eval.scoring.score_requests`.
``generate_until`` is greedy (:func:`deepwhale.eval.gen_runner.greedy`): ``until`` and
``max_gen_toks`` (default 256) from the request, the context left-truncated to
``max_length - max_gen_toks`` tokens, as lm-eval's HF model does; sampling is refused.

Needs the ``eval`` extra (``pip install "deepwhale[eval]"``).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (fills lm-eval's registry before we add to it)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from deepwhale.eval.scoring import prefix_token_id, score_requests
from deepwhale.eval.windows import rolling_windows


@register_model("deepwhale")
class DeepwhaleLM(TemplateLM):
    """lm-eval ``LM`` over a :class:`~deepwhale.api.DeepSeekModel`.

    Raises (at construction):
        CheckpointError / ConfigError / TokenizerError: the model does not load.
        ValueError: no tokenizer, or a bad ``batch_size`` / ``ppl_stride``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 1,
        ppl_stride: int | str = 1,
        **_ignored,  # lm-eval passes max_batch_size and friends
    ) -> None:
        super().__init__()
        from deepwhale.api import DeepSeekModel

        self.model = DeepSeekModel.from_pretrained(pretrained, dtype=dtype, device=device)
        if self.model.tokenizer is None:
            raise ValueError(f"{self.model.path}: no tokenizer.json; evaluation needs one")
        self.tokenizer = self.model.tokenizer
        text = str(batch_size if batch_size is not None else 1)
        self.batch_size = int(text) if text.isdigit() else 16  # "auto": a fixed 16 rows
        self.ppl_stride = int(ppl_stride)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        """The model's context (``max_position_embeddings``), tokens."""
        return self.model.config.max_position_embeddings

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """Token ids with the tokenizer's defaults (BOS when it adds one), as lm-eval's HF model."""
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        scores = score_requests(self.model.module, pairs, self.max_length, self.batch_size)
        for (key, _, _), s in zip(requests, scores, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.is_greedy))
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each document over :func:`rolling_windows`."""
        out = []
        for req in requests:
            (string,) = req.args
            wins = rolling_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, self.ppl_stride
            )
            pairs = [(w.context, w.targets) for w in wins]
            scores = score_requests(self.model.module, pairs, self.max_length, self.batch_size)
            total = sum(s.logprob for s in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy completions, one per request ``(context, gen_kwargs)``.

        Raises:
            ValueError: sampling asked for (``do_sample`` true or a temperature above 0), or
                ``max_gen_toks`` not below the model's context.
        """
        from deepwhale.eval.gen_runner import greedy

        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) not in (0, 0.0, None):
                raise ValueError("deepwhale's lm-eval model generates greedily only")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", 256))
            room = self.max_length - max_gen
            if room < 1:
                raise ValueError(f"max_gen_toks {max_gen} >= the context {self.max_length}")
            ids = self.tok_encode(context)[-room:]
            (text,) = greedy(self.model, [ids], until, max_gen, 1)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out
