"""Training configuration: one dataclass per section, loaded from YAML, overridable by dotted keys.

A run is described by :class:`TrainConfig`. Its sections mirror torchtitan's job config and litgpt's
``--optimizer.lr`` style: ``model``, ``data``, ``optim``, ``schedule``, ``train``, ``moe``, ``eval``,
``checkpoint``, ``log`` and ``lora``. Any key can be overridden from the command line with
``--set optim.lr=3e-4`` (or a bare ``optim.lr=3e-4`` argument). Values are parsed as YAML and then
converted to the field's type, so ``3e-4``, ``true``, ``[100, 200]`` and ``null`` all work.

Every unknown key, wrong type or out-of-range value raises :class:`TrainConfigError` with the dotted
key and, for unknown keys, the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepwhale.parallel.layout import LayoutError, ParallelLayout
from deepwhale.typed_config import ConfigError, Loader


class TrainConfigError(ConfigError):
    """A training config that cannot run: unknown key, wrong type, bad value or missing file."""


#: the typed loader of the sections: strings from ``--set`` overrides are converted to the
#: field's type; errors are :class:`TrainConfigError`, a layout's own error keeps its message
LOADER = Loader(error=TrainConfigError, passthrough=(LayoutError,))


@dataclass
class ModelSection:
    """Which model to train.

    Attributes:
        name: a flavour from :mod:`deepwhale.model.flavours` (random init), a checkpoint folder
            (``config.json`` + safetensors, loaded with its weights) or a ``config.json`` file
            (random init).
        tokenizer: folder with ``tokenizer.json`` for text/JSONL/chat data; default the model
            folder when it has one, else the bundled stories260K tokenizer (512 ids, which the
            ``debug-*`` flavours match). Packed shards need no tokenizer.
        vocab_size: override the vocabulary of a flavour / config.json (default: the shard
            manifest's ``vocab_size`` for a flavour trained on shards, else the flavour's).
        init_std: standard deviation of the normal random init, for flavours and config.json.
    """

    name: str = "debug-llama"
    tokenizer: str | None = None
    vocab_size: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        LOADER.require(bool(self.name), "model.name", "must name a flavour, folder or config.json")
        if self.vocab_size is not None:
            LOADER.require(self.vocab_size > 0, "model.vocab_size", "must be > 0")
        LOADER.require(self.init_std > 0, "model.init_std", "must be > 0")


@dataclass
class DataSection:
    """Where the tokens come from.

    Attributes:
        path: a packed-shard folder (``manifest.json``, written by the data pipeline), a ``.txt``
            file, or a ``.jsonl`` file (``{"text": ...}`` lines, or chat lines for SFT).
        format: ``auto`` (from the path), ``shards``, ``text``, ``jsonl`` or ``chat``
            (``{"messages": [...]}`` or GSM8K-style ``{"question", "answer"}`` lines; the chat
            template is applied and prompt tokens are masked from the loss).
        text_key: JSON key holding the document text for ``jsonl``.
        seq_len: tokens per packed row for text/JSONL (inputs are ``seq_len - 1`` tokens); the
            longest example (tokens) for chat, longer ones are truncated. Shards use their manifest.
        val_path: a separate validation set in the same format.
        val_fraction: without ``val_path``, hold out this share of rows/examples (the last ones).
        limit: read at most this many documents / chat examples (quick runs); None = all.
        chat_template: Jinja source used when the tokenizer has no chat template (None: a plain
            ``User: ... Assistant: ...`` template).
    """

    path: str = ""
    format: str = "auto"
    text_key: str = "text"
    seq_len: int = 256
    val_path: str | None = None
    val_fraction: float = 0.0
    limit: int | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        LOADER.choice("data.format", self.format, ("auto", "shards", "text", "jsonl", "chat"))
        LOADER.require(self.seq_len >= 2, "data.seq_len", "must be >= 2")
        LOADER.require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        if self.limit is not None:
            LOADER.require(self.limit > 0, "data.limit", "must be > 0")


@dataclass
class OptimSection:
    """AdamW (Loshchilov & Hutter 2019) and gradient clipping.

    Attributes:
        lr: peak learning rate (the ``cosine`` / ``constant`` schedules scale it).
        weight_decay: decoupled weight decay on matrices (not on norms, biases or embeddings).
        beta1, beta2, eps: AdamW moments and epsilon.
        grad_clip: clip the global gradient L2 norm to this (0 = no clipping).
    """

    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        LOADER.require(self.lr > 0, "optim.lr", "must be > 0")
        LOADER.require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        LOADER.require(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "in [0, 1)"
        )
        LOADER.require(self.eps > 0, "optim.eps", "must be > 0")
        LOADER.require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class ScheduleSection:
    """Learning-rate schedule (see :mod:`deepwhale.train.schedule`).

    Attributes:
        name: ``cosine`` (warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step),
            ``constant`` (warm-up, then ``lr``) or ``staged`` (warm-up, then the piecewise-constant
            ``stage_lrs``; DeepSeek's fine-tuning advice ``1e-5 -> 5e-6 -> 1e-6``).
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to the first value, optimizer steps.
        min_lr_ratio: floor of the cosine schedule as a share of ``optim.lr``.
        stage_lrs: absolute learning rates of the stages of ``staged`` (``optim.lr`` is ignored).
        stage_steps: optimizer steps at which stage 2, 3, ... begin (``len(stage_lrs) - 1``
            increasing values).
    """

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    stage_lrs: list[float] = field(default_factory=lambda: [1e-5, 5e-6, 1e-6])
    stage_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        LOADER.choice("schedule.name", self.name, ("cosine", "constant", "staged"))
        LOADER.require(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        LOADER.require(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")
        if self.name == "staged":
            LOADER.require(bool(self.stage_lrs), "schedule.stage_lrs", "needs at least one value")
            LOADER.require(all(v > 0 for v in self.stage_lrs), "schedule.stage_lrs", "must be > 0")
            LOADER.require(
                len(self.stage_steps) == len(self.stage_lrs) - 1,
                "schedule.stage_steps",
                f"needs {len(self.stage_lrs) - 1} boundaries for {len(self.stage_lrs)} stage_lrs, "
                f"got {self.stage_steps}",
            )
            LOADER.require(
                all(a < b for a, b in zip(self.stage_steps, self.stage_steps[1:], strict=False))
                and all(s > 0 for s in self.stage_steps),
                "schedule.stage_steps",
                f"must be positive and increasing, got {self.stage_steps}",
            )


@dataclass
class TrainSection:
    """The loop.

    Attributes:
        steps: optimizer steps in the whole run (resumed runs count from the checkpoint).
        micro_batch_size: sequences per forward/backward.
        grad_accum: micro-batches per optimizer step; the loss is the summed token loss over the
            window divided by its label tokens, so ``8 x 1`` and ``1 x 8`` give the same update.
        seed: seeds the init, the sampling order and dropout.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16`` (autocast;
            master weights and optimizer state stay fp32).
        activation_checkpointing: ``none`` or ``full`` (recompute each checkpointed decoder
            layer's forward in backward: less activation memory, about one more forward of
            compute; :mod:`deepwhale.train.ac_compile`).
        ac_every: under ``full``, checkpoint every ``ac_every``-th decoder layer (1 = all).
        compile: ``torch.compile`` each decoder layer (after checkpointing, before FSDP2/DDP).
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` for checks).
    """

    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    activation_checkpointing: str = "none"
    ac_every: int = 1
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        LOADER.require(self.steps > 0, "train.steps", "must be > 0")
        LOADER.require(self.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
        LOADER.require(self.grad_accum > 0, "train.grad_accum", "must be > 0")
        LOADER.choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        LOADER.choice(
            "train.activation_checkpointing", self.activation_checkpointing, ("none", "full")
        )
        LOADER.require(self.ac_every > 0, "train.ac_every", "must be > 0")


@dataclass
class MoESection:
    """DeepSeekMoE load balancing during training (see :mod:`deepwhale.train.moe`).

    Attributes:
        aux_loss_alpha: weight of the auxiliary balance loss (DeepSeek-V2 §2.2.3 expert-level
            loss; DeepSeek-V3 §2.1.2 sequence-wise loss); None = the model config's
            ``aux_loss_alpha`` (0 disables it).
        seq_aux: compute the balance loss per sequence (True) or over the whole micro-batch; None
            = the model config's ``seq_aux``.
        bias_update_speed: gamma of the auxiliary-loss-free update of ``e_score_correction_bias``
            for ``noaux_tc`` routers (DeepSeek-V3 §2.1.2: ``b += gamma * sign(mean_load - load)``
            after each optimizer step; V3 used 0.001); 0 disables it. Ignored under LoRA.
    """

    aux_loss_alpha: float | None = None
    seq_aux: bool | None = None
    bias_update_speed: float = 0.001

    def __post_init__(self) -> None:
        if self.aux_loss_alpha is not None:
            LOADER.require(self.aux_loss_alpha >= 0, "moe.aux_loss_alpha", "must be >= 0")
        LOADER.require(self.bias_update_speed >= 0, "moe.bias_update_speed", "must be >= 0")


@dataclass
class EvalSection:
    """Validation loss and perplexity.

    Attributes:
        interval: evaluate every this many optimizer steps and at the end (0 = only at the end).
        max_batches: micro-batches per evaluation (the first ones of the validation set).
    """

    interval: int = 0
    max_batches: int = 10

    def __post_init__(self) -> None:
        LOADER.require(self.interval >= 0, "eval.interval", "must be >= 0")
        LOADER.require(self.max_batches > 0, "eval.max_batches", "must be > 0")


@dataclass
class CheckpointSection:
    """Periodic checkpoints under ``<out_dir>/checkpoints/step-NNNNNNNN`` and resume.

    Attributes:
        interval: save every this many optimizer steps (0 = none besides the final model).
        keep_last: keep the newest K complete checkpoints.
        resume: ``none``, ``auto`` (the newest complete checkpoint in ``out_dir``; a fresh
            start when there is none; step-N folders that are incomplete or truncated are
            skipped with a warning, and when every one is, the run stops with exit code 2) or a
            checkpoint folder. A worker restarted by ``torchrun --max-restarts``
            (``TORCHELASTIC_RESTART_COUNT`` > 0) always resumes as ``auto``.
        save_final: write the final model as an HF folder ``<out_dir>/final`` (LoRA runs write
            the adapter to ``<out_dir>/adapter``).
        async_save: parallel runs (torchrun) write checkpoints with
            ``torch.distributed.checkpoint.async_save`` on a separate gloo group: the state is
            copied to CPU memory (one extra copy of each rank's model and optimizer shards), then
            a background thread writes it while training goes on; the folder is renamed into
            place only once every rank's files are on disk. Checked on gloo/CPU with torch
            2.13 (DDP, shards equal to a synchronous save's). False: every rank waits for the
            write. One-process runs always save synchronously.
    """

    interval: int = 0
    keep_last: int = 2
    resume: str = "none"
    save_final: bool = True
    async_save: bool = True

    def __post_init__(self) -> None:
        LOADER.require(self.interval >= 0, "checkpoint.interval", "must be >= 0")
        LOADER.require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass
class LogSection:
    """Metrics output.

    Attributes:
        interval: log the training loss every this many optimizer steps.
        csv: write ``<out_dir>/metrics.csv``.
        tensorboard: write TensorBoard events to ``<out_dir>/tb``.
        quiet: no progress bar and no console lines.
    """

    interval: int = 10
    csv: bool = True
    tensorboard: bool = True
    quiet: bool = False

    def __post_init__(self) -> None:
        LOADER.require(self.interval > 0, "log.interval", "must be > 0")


@dataclass
class LoraSection:
    """Low-rank adapters (Hu et al. 2021, arXiv:2106.09685) via PEFT; see :mod:`deepwhale.lora`.

    Attributes:
        enabled: train LoRA adapters on a frozen base model instead of all weights.
        r: adapter rank.
        alpha: scaling numerator; the update is ``(alpha / r) * B @ A``.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt; None = :func:`deepwhale.lora.default_target_modules`.
    """

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        LOADER.require(self.r > 0, "lora.r", "must be > 0")
        LOADER.require(self.alpha > 0, "lora.alpha", "must be > 0")
        LOADER.require(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")


@dataclass
class TrainConfig:
    """A whole training run.

    Attributes:
        out_dir: run folder: ``metrics.csv``, ``tb/``, ``checkpoints/``, ``final/`` / ``adapter/``.
        model, data, optim, schedule, train, moe, eval, checkpoint, log, lora, parallel: the
            sections (``parallel`` is :class:`~deepwhale.parallel.layout.ParallelLayout`; it
            matters only under ``torchrun``).
    """

    out_dir: str = "runs/train"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    moe: MoESection = field(default_factory=MoESection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    lora: LoraSection = field(default_factory=LoraSection)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainConfig:
        """Build and validate from a nested dict.

        Raises:
            TrainConfigError: an unknown key (the message lists the valid keys of its section), a
                value of the wrong type, or an out-of-range value.
        """
        return LOADER.build(cls, data or {}, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply ``key=value`` overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: dotted ``section.key=value`` strings, applied in order; values parse as YAML.

    Raises:
        TrainConfigError: a missing or malformed file (``FILE:LINE: malformed YAML (...)``), an
            override without ``=``, an unknown key or a bad value (the message names the key).
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise TrainConfigError(f"{p}: config file not found") from None
        except UnicodeDecodeError as e:
            raise TrainConfigError(f"{p}: not UTF-8 text (byte offset {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise TrainConfigError(f"{where}: malformed YAML ({problem})") from None
        except OSError as e:
            raise TrainConfigError(f"{p}: cannot read the config ({e.strerror or e})") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{p}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise TrainConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return TrainConfig.from_dict(data)
