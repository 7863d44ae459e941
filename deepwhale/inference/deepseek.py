"""The Python facade: ``DeepSeekModel`` and ``generate_text``, under the names DeepSeek's own
examples use.

    from deepwhale.inference import DeepSeekModel, generate_text
    model = DeepSeekModel.from_pretrained("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    print(model.generate("Once upon a time", max_new_tokens=50))
    print(generate_text("Once upon a time", max_length=200))   # bundled stories260K model

The server, the evaluation and the CLI are thin layers over this module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

# DEFAULT_MODEL (public here and in deepwhale.api) is checkpoint.hub's, the bundled stories260K
from deepwhale.checkpoint.hub import DEFAULT_MODEL, CheckpointError, resolve_checkpoint
from deepwhale.checkpoint.io import load_model, save_model
from deepwhale.device import resolve_device, resolve_dtype
from deepwhale.inference.embeddings import embed
from deepwhale.inference.engine import Engine, Request
from deepwhale.inference.generate import GenerationChunk, PromptTooLongError, generate_stream
from deepwhale.inference.sampling import SamplingParams
from deepwhale.inference.speculative import SpeculativeStats, speculative_decode
from deepwhale.lora import apply_lora, merge_lora, save_adapter  # noqa: F401  (public API)
from deepwhale.model.config import ModelConfig
from deepwhale.model.transformer import CausalLM
from deepwhale.tokenizer import Tokenizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


class DeepSeekModel:
    """A loaded model with its tokenizer, ready to generate.

    Attributes:
        module: the :class:`~deepwhale.model.transformer.CausalLM` (a plain ``nn.Module``).
        tokenizer: the :class:`~deepwhale.tokenizer.Tokenizer`, or None for weights-only folders.
        path: the local folder it was loaded from (None when built in memory).
    """

    def __init__(
        self, module: CausalLM, tokenizer: Tokenizer | None = None, path: Path | None = None
    ) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.path = path
        self.batch_size = 8
        self.max_seq_len: int | None = None
        self._engine: Engine | None = None
        #: torch.compile arguments of the engine's decode step (compile() / enable_tensorrt()),
        #: applied again to an engine rebuilt by set_batch_size; None: eager
        self._compile_kwargs: dict | None = None

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        load_mtp: bool = False,
    ) -> DeepSeekModel:
        """Load a HF-layout checkpoint folder or Hub repo id (default: the bundled stories260K).

        Args:
            path_or_repo_id: local folder or ``org/name`` repo id; None for the bundled model.
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a ``torch.dtype`` or None
                (fp32 on CPU, bf16 on CUDA). FP8 checkpoints are dequantized to it.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
            revision: Hub revision for repo ids.
            load_mtp: also load DeepSeek-V3's multi-token-prediction module into
                ``module.mtp`` (for MTP speculative decoding,
                :mod:`deepwhale.inference.speculative`); off by default.

        Raises:
            CheckpointError: missing folder, failed download (offline), truncated file, or a
                missing / unexpected / mis-shaped tensor (names key and file); ``load_mtp`` for
                a checkpoint without an MTP module.
            ConfigError: malformed or unsupported config.json.
            TokenizerError: a malformed tokenizer.json or tokenizer_config.json.
        """
        if path_or_repo_id is not None and not str(path_or_repo_id).strip():
            raise CheckpointError("the model path is empty; pass a folder or a repo id")
        folder = resolve_checkpoint(path_or_repo_id or DEFAULT_MODEL, revision=revision)
        device = resolve_device(device)
        module = _load_module(folder, resolve_dtype(dtype, device), device, load_mtp)
        tokenizer = (
            Tokenizer.from_pretrained(folder) if (folder / "tokenizer.json").exists() else None
        )
        return cls(module, tokenizer, folder)

    def save_pretrained(self, folder: str | Path, max_shard_size: int = 5 * 1024**3) -> Path:
        """Write config.json, safetensors and the tokenizer files to ``folder``.

        transformers' ``AutoModelForCausalLM.from_pretrained(folder)`` loads it back with
        identical logits. Returns the folder.

        Raises:
            ValueError: the model carries LoRA adapters (save them with
                :func:`~deepwhale.lora.save_adapter`, or :func:`~deepwhale.lora.merge_lora`
                first to write a full model).
        """
        if hasattr(self.module, "peft_config"):
            raise ValueError(
                "this model has LoRA adapters: save_adapter(model, dir) writes the adapter in "
                "PEFT's format; merge_lora(model) first to save a full merged model"
            )
        folder = Path(folder)
        if getattr(self.module, "quantization", None):
            from deepwhale.inference.quantize import save_quantized

            save_quantized(self.module, folder, max_shard_size=max_shard_size)
        else:
            save_model(self.module, folder, max_shard_size=max_shard_size)
        if self.path is not None and self.path.resolve() != folder.resolve():
            for name in TOKENIZER_FILES:
                if (self.path / name).exists():
                    shutil.copyfile(self.path / name, folder / name)
        return folder

    @property
    def config(self) -> ModelConfig:
        """The model's :class:`~deepwhale.model.config.ModelConfig`."""
        return self.module.config

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return next(self.module.parameters()).device

    def __call__(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits ``(B, T, V)`` for ``input_ids`` ``(B, T)``; see :meth:`CausalLM.forward`."""
        with torch.inference_mode():
            return self.module(input_ids.to(self.device), **kwargs)

    # ------------------------------------------------------------------ generation
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: no tokenizer.json; text generation needs one")
        return self.tokenizer

    def encode_prompt(self, prompt: str | list[dict] | list[int]) -> list[int]:
        """Token ids for a prompt: a string, chat ``messages`` (through the chat template), or
        token ids (used as they are).

        Raises:
            TokenizerError: chat messages given but the model has no chat template, or text
                that is not valid Unicode.
            ValueError: a prompt of another type, or token ids outside the vocabulary.
        """
        tok = self._require_tokenizer()
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt
        ):
            vocab = self.config.vocab_size
            if any(not 0 <= i < vocab for i in prompt):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
            return list(prompt)
        raise ValueError(
            "prompt must be a string, a list of chat messages ({'role': ..., 'content': ...}) "
            f"or a list of token ids; got {type(prompt).__name__}"
        )

    def stream(
        self,
        prompt: str | list[dict] | list[int],
        params: SamplingParams | None = None,
        **sampling,
    ) -> Iterator[GenerationChunk]:
        """Yield :class:`GenerationChunk` deltas for ``prompt`` (a string, chat messages or
        token ids; see :meth:`encode_prompt`).

        Args:
            prompt: what to continue.
            params: how to sample; or give its fields as keywords instead (``max_new_tokens``,
                ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``...), not both.

        Raises:
            PromptTooLongError: the prompt does not fit the context.
            TypeError: ``params`` is not a :class:`SamplingParams`, or both it and keywords.
            ValueError: an invalid sampling value.
        """
        params = _sampling_params(params, sampling)
        ids = self.encode_prompt(prompt)
        self.module.eval()
        return generate_stream(self.module, self._require_tokenizer(), ids, params)

    def generate(
        self,
        prompt: str | list[dict] | list[int],
        params: SamplingParams | None = None,
        **sampling,
    ) -> str:
        """Generate and return the new text (prompt excluded); see :meth:`stream`."""
        return "".join(chunk.text for chunk in self.stream(prompt, params, **sampling))

    def generate_speculative(
        self,
        prompt: str | list[dict] | list[int],
        draft: str | Path | DeepSeekModel | CausalLM = "mtp",
        k: int = 4,
        params: SamplingParams | None = None,
        **sampling,
    ) -> tuple[str, SpeculativeStats]:
        """Generate with speculative decoding (:mod:`deepwhale.inference.speculative`): greedy
        output identical to :meth:`generate` at ``temperature=0``; sampled output distributed as
        the target samples.

        Args:
            prompt: as :meth:`stream`.
            draft: ``"mtp"`` (this model's MTP module: ``from_pretrained(..., load_mtp=True)``),
                a draft :class:`DeepSeekModel` / :class:`CausalLM` with the same tokenizer, or a
                folder or repo id to load one from (same device and dtype as this model).
            k: draft tokens per round.
            params, sampling: as :meth:`stream`; ``stop`` strings cut the text after decoding.

        Returns:
            ``(text, stats)``: the new text and the :class:`SpeculativeStats` (acceptance).

        Raises:
            PromptTooLongError, TypeError: as :meth:`stream`.
            ValueError: as :func:`~deepwhale.inference.speculative.speculative_decode` (no MTP
                module, a mismatched draft, penalties with sampling).
            CheckpointError: a draft folder that does not load.
        """
        params = _sampling_params(params, sampling)
        tok = self._require_tokenizer()
        ids = self.encode_prompt(prompt)
        if isinstance(draft, DeepSeekModel):
            draft = draft.module
        elif isinstance(draft, Path) or (isinstance(draft, str) and draft != "mtp"):
            dtype = next(self.module.parameters()).dtype
            draft = DeepSeekModel.from_pretrained(draft, dtype=dtype, device=self.device).module
        self.module.eval()
        eos = frozenset() if params.ignore_eos else frozenset(tok.eos_token_ids)
        result = speculative_decode(self.module, ids, params.max_new_tokens, draft, k, eos, params)
        text = tok.decode(result.tokens, skip_special_tokens=True)
        cuts = [i for s in params.stop if (i := text.find(s)) >= 0]
        return (text[: min(cuts)] if cuts else text), result.stats

    # ------------------------------------------------------------------ embeddings
    def embed(
        self,
        inputs: str | list[str | list[int]],
        pooling: str = "mean",
        normalize: bool = True,
    ) -> torch.Tensor:
        """Sentence embeddings: the final hidden states (after the final norm), pooled per input
        (``"mean"`` over its tokens, or its ``"last"`` token's), L2-normalised unless
        ``normalize=False``; see :func:`deepwhale.inference.embeddings.embed`.

        Args:
            inputs: a string, or a list of strings (tokenized as prompts, BOS included when the
                tokenizer adds one) and token-id lists (used as they are).
            pooling: ``"mean"`` or ``"last"``.
            normalize: L2-normalise each vector.

        Returns:
            ``(N, hidden_size)`` float32 on the CPU, one row per input (1 for a string).

        Raises:
            ValueError: an unknown pooling, an empty input, or token ids outside the vocabulary.
        """
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        ids = [self.encode_prompt(x) for x in items]
        self.module.eval()
        return embed(self.module, ids, pooling=pooling, normalize=normalize)

    # ------------------------------------------------------------------ batched engine
    def set_batch_size(self, batch_size: int, max_seq_len: int | None = None) -> DeepSeekModel:
        """Set the engine's concurrent sequences (cache slots) and, optionally, tokens per slot.

        The cache is re-allocated on next use: ``batch_size * max_seq_len`` tokens of
        :func:`~deepwhale.model.cache.cache_bytes_per_token` each. Returns ``self``.

        Raises:
            ValueError: ``batch_size`` < 1, or ``max_seq_len`` not in [1, the model's
                ``max_position_embeddings``].
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        context = self.module.config.max_position_embeddings
        if max_seq_len is not None and (
            not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= context
        ):
            raise ValueError(
                f"max_seq_len must be an integer in [1, {context}] (the model's "
                f"max_position_embeddings), got {max_seq_len!r}"
            )
        if self._engine is not None and self._engine._thread is not None:
            raise RuntimeError("the engine is serving; stop it before resizing")
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self._engine = None
        return self

    @property
    def engine(self) -> Engine:
        """The continuous-batching :class:`~deepwhale.inference.engine.Engine` (made on first use)."""
        if self._engine is None:
            self.module.eval()
            self._engine = Engine(
                self.module,
                self._require_tokenizer(),
                max_batch_size=self.batch_size,
                max_seq_len=self.max_seq_len,
            )
            if self._compile_kwargs is not None:  # a rebuilt engine keeps the compile settings
                self._engine.compile_decode(**self._compile_kwargs)
        return self._engine

    def submit(
        self,
        prompt: str | list[dict] | list[int],
        params: SamplingParams | None = None,
        *,
        n: int = 1,
        logprobs: int | None = None,
        **sampling,
    ) -> Request:
        """Queue ``prompt`` on the engine and make sure its background loop runs; returns the
        :class:`Request` (iterate it to stream ``(sample_index, chunk)``).

        Args:
            prompt: a string, chat messages or token ids (see :meth:`encode_prompt`).
            params: how to sample; or give its fields as keywords instead
                (``submit(prompt, temperature=0.8, max_new_tokens=5)``), not both.
            n: independent samples (sample ``i`` uses ``seed + i``).
            logprobs: None, or how many top alternatives to report per token (0-20).

        Raises:
            TypeError: ``params`` is not a :class:`SamplingParams` (``n`` given by position,
                as before ``params`` existed: pass ``n=``), or both ``params`` and keywords.
            PromptTooLongError, ValueError: see :meth:`Engine.add_request`.
        """
        params = _sampling_params(params, sampling)
        ids = self.encode_prompt(prompt)
        req = self.engine.add_request(ids, params, n=n, logprobs=logprobs)
        self.engine.start()
        return req

    def generate_batch(
        self,
        prompts: list[str | list[dict] | list[int]],
        params: SamplingParams | None = None,
        **sampling,
    ) -> list[str]:
        """Generate for many prompts at once with continuous batching; returns one text each.

        ``params`` (or its fields as keywords, not both) applies to every prompt. Prompts beyond
        the batch size wait and join as slots free up. Greedy output is identical to running
        each prompt alone.

        Raises:
            TypeError: ``params`` is not a :class:`SamplingParams`, or both it and keywords.
            PromptTooLongError, ValueError: see :meth:`Engine.add_request`.
        """
        params = _sampling_params(params, sampling)
        ids = [self.encode_prompt(p) for p in prompts]
        return [r.texts()[0] for r in self.engine.generate(ids, params)]

    # ------------------------------------------------------------------ acceleration
    def quantize(self, mode: str = "int8", lm_head: bool = False) -> DeepSeekModel:
        """Quantize the linear layers to int8 in place (a model-to-model transform).

        Args:
            mode: ``"int8"`` (weight-only: int8 weights with per-channel scales) or
                ``"int8-dynamic"`` (W8A8: activations quantized per token at run time). The
                kernel is the fastest measured per device; see :mod:`deepwhale.inference.quantize`.
            lm_head: also quantize the output head (faster decode, ~0.1% perplexity).

        ``save_pretrained`` then writes an int8 checkpoint that ``from_pretrained`` loads back
        with identical logits. Returns ``self``.

        Raises:
            ValueError: an unknown mode, or a model that is already quantized.
        """
        from deepwhale.inference.quantize import quantize_model

        if getattr(self.module, "quantization", None):
            raise ValueError(f"the model is already quantized ({self.module.quantization['mode']})")
        quantize_model(self.module, mode, lm_head=lm_head)
        return self

    def compile(self, mode: str | None = None) -> DeepSeekModel:
        """``torch.compile`` the engine's decode step (its function boundary; static cache shapes).

        On CPU the gain is small (~1.1x); on CUDA it removes most launch overhead. The first
        step after compiling takes tens of seconds. Returns ``self``.
        """
        self._compile_kwargs = {"mode": mode}
        if self._engine is not None:
            self._engine.compile_decode(mode)
        return self

    def enable_tensorrt(self, precision: str = "fp16") -> DeepSeekModel:
        """Compile the decode step with the Torch-TensorRT backend at ``precision``.

        Args:
            precision: ``"fp16"``, ``"bf16"`` or ``"fp32"``.

        Raises:
            RuntimeError: no CUDA device, or the ``torch-tensorrt`` package is not installed (the
                message says which); it never silently does nothing.
            ValueError: an unknown precision.
        """
        precisions = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        if precision not in precisions:
            raise ValueError(f"precision must be one of {', '.join(precisions)}, got {precision!r}")
        if not torch.cuda.is_available():
            raise RuntimeError(
                "enable_tensorrt needs a CUDA GPU and none is visible; on CPU use "
                "model.compile() or model.quantize('int8') instead"
            )
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "enable_tensorrt needs the torch-tensorrt package matching your torch "
                f"({torch.__version__}): pip install torch-tensorrt ({e})"
            ) from e
        self.module.to(device="cuda", dtype=precisions[precision])
        self._engine = None
        self._compile_kwargs = {
            "backend": "torch_tensorrt",
            "options": {"enabled_precisions": {precisions[precision]}},
        }
        self.engine  # noqa: B018  (built, and compiled with the settings above)
        return self


def _sampling_params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    """``params`` as given, or a :class:`SamplingParams` built from keyword fields."""
    if params is None:
        return SamplingParams(**sampling)
    if not isinstance(params, SamplingParams):
        raise TypeError(
            f"params must be a SamplingParams, got {type(params).__name__} (pass n= and "
            "logprobs= by keyword)"
        )
    if sampling:
        raise TypeError(
            f"pass either params or sampling keywords, not both (got {', '.join(sampling)})"
        )
    return params


def _load_module(folder: Path, dtype: torch.dtype, device: str, load_mtp: bool = False) -> CausalLM:
    """A plain or deepwhale-int8 checkpoint, by its ``quantization_config``."""
    from deepwhale.inference.quantize import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(ModelConfig.from_json_file(folder / "config.json")):
        if load_mtp:
            raise CheckpointError(
                f"{folder}: load_mtp=True is not supported for deepwhale-int8 checkpoints yet; "
                "load the unquantized checkpoint for MTP"
            )
        return load_quantized(folder, device=device, dtype=dtype)
    return load_model(folder, dtype=dtype, device=device, load_mtp=load_mtp)


_DEFAULT: dict[str, DeepSeekModel] = {}


def generate_text(
    prompt: str,
    max_length: int = 200,
    model: DeepSeekModel | str | Path | None = None,
    max_new_tokens: int | None = None,
    **sampling,
) -> str:
    """Generate a continuation of ``prompt``, the way DeepSeek's examples call it.

    Args:
        prompt: input text.
        max_length: total length budget in tokens, prompt included (HF ``generate`` semantics).
        model: a loaded :class:`DeepSeekModel`, a folder or repo id, or None for the bundled
            stories260K model (loaded once and reused).
        max_new_tokens: if given, the number of new tokens instead of ``max_length``.
        **sampling: further :class:`SamplingParams` fields (default greedy: ``temperature=0``).

    Returns:
        The generated text, without the prompt.

    Raises:
        PromptTooLongError: the prompt already uses ``max_length`` tokens or the context.
    """
    if not isinstance(model, DeepSeekModel):
        key = str(model or DEFAULT_MODEL)
        if key not in _DEFAULT:
            _DEFAULT[key] = DeepSeekModel.from_pretrained(model)
        model = _DEFAULT[key]
    if max_new_tokens is None:
        n_prompt = len(model.encode_prompt(prompt))
        max_new_tokens = max_length - n_prompt
        if max_new_tokens < 1:
            raise PromptTooLongError(
                f"the prompt is {n_prompt} tokens, which leaves nothing of max_length={max_length}"
            )
    sampling.setdefault("temperature", 0.0)
    return model.generate(prompt, max_new_tokens=max_new_tokens, **sampling)
