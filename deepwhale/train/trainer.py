"""Single-process training loop: pretraining and full or LoRA fine-tuning.

The model stays single-device ``nn.Module`` code; this loop only calls it. One optimizer step:

1. set the learning rate of step ``s`` from the schedule (a pure function of ``s``);
2. take ``grad_accum`` micro-batches from the seeded :class:`~deepwhale.train.data.EpochSampler`
   and count the label tokens (labels != -100) of the whole window;
3. for each micro-batch: ``loss = sum of token cross-entropies / window tokens`` (plus the MoE
   balance loss) and ``backward``, so accumulation gives exactly the gradient of one big batch
   even when micro-batches hold different numbers of real tokens;
4. clip the global gradient norm, AdamW step, then the DeepSeek-V3 router-bias update.

fp32 on CPU; bf16 autocast on CUDA (fp32 master weights). Checkpoints hold everything an
uninterrupted run would have in memory at that step, so a resumed run repeats it bit for bit.

This module stays whole (about 670 lines) because :class:`Trainer` is one object whose steps
share the run's state (model, optimizer, sampler, RNG streams, checkpoint); the parts that stand
alone already live beside it (``schedule``, ``loss``, ``data``, ``checkpoint``, ``recovery``,
``metrics``, ``moe``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepwhale.checkpoint.hub import DEFAULT_MODEL
from deepwhale.device import resolve_device as _resolve_device
from deepwhale.train import checkpoint as ckpt
from deepwhale.train import recovery
from deepwhale.train.config import TrainConfig, TrainConfigError
from deepwhale.train.data import IGNORE_INDEX, EpochSampler, build_datasets, check_vocab, collate
from deepwhale.train.loss import token_cross_entropy_sum
from deepwhale.train.metrics import MetricsLogger, Progress, perplexity
from deepwhale.train.schedule import schedule_from_config

#: the tokenizer for text data without one: the bundled stories260K (checkpoint.hub.DEFAULT_MODEL)
BUNDLED_TOKENIZER = DEFAULT_MODEL

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a :class:`torch.device` (see :func:`deepwhale.device.resolve_device`).

    Raises:
        TrainConfigError: an unknown device, or CUDA asked for where there is none.
    """
    try:
        return torch.device(_resolve_device(name))
    except ValueError as e:
        raise TrainConfigError(f"train.device: {e}") from None


def build_model(model_cfg, seed: int, data_vocab: int | None = None):
    """The model of a :class:`~deepwhale.train.config.ModelSection`, in fp32 on CPU, train mode.

    Returns:
        ``(model, folder)``: a :class:`~deepwhale.model.transformer.CausalLM` and the checkpoint
        folder it came from (None for a random init).

    Raises:
        TrainConfigError: ``model.name`` is neither a flavour, a checkpoint folder nor a
            config.json (the message lists the flavours).
        ConfigError / CheckpointError: a bad config.json or checkpoint.
    """
    from deepwhale.checkpoint.io import load_model
    from deepwhale.model.config import ModelConfig
    from deepwhale.model.flavours import FLAVOURS, flavour_config
    from deepwhale.model.transformer import CausalLM

    name = model_cfg.name
    path = Path(name)
    overrides = {}
    vocab = model_cfg.vocab_size or data_vocab
    if name in FLAVOURS:
        if vocab:
            overrides["vocab_size"] = vocab
        config = flavour_config(name, **overrides)
        folder = None
    elif path.is_dir():
        if model_cfg.vocab_size:
            raise TrainConfigError("model.vocab_size cannot change a checkpoint's vocabulary")
        _check_trainable(ModelConfig.from_json_file(path / "config.json"))
        model = load_model(path, dtype=torch.float32, device="cpu")
        return model.train(), path
    elif path.is_file() and path.suffix == ".json":
        config = ModelConfig.from_json_file(path)
        if model_cfg.vocab_size:
            config.vocab_size = model_cfg.vocab_size
        folder = None
    else:
        raise TrainConfigError(
            f"model.name {name!r} is neither a flavour ({', '.join(sorted(FLAVOURS))}), a "
            "checkpoint folder nor a config.json file"
        )
    _check_trainable(config)
    model = CausalLM(config)
    model.init_weights(std=model_cfg.init_std, generator=torch.Generator().manual_seed(seed))
    return model.train(), folder


def _check_trainable(config) -> None:
    """Refuse a layout the training loop cannot train faithfully yet.

    Raises:
        TrainConfigError: ``deepseek_v32``: its lightning indexer learns from a KL loss against
            the dense attention distribution (DeepSeek-V3.2 §2.1.1, dense warm-up and sparse
            training stages), which this trainer does not compute; the LM loss alone gives the
            indexer no gradient (its top-k choice is not differentiable).
    """
    if config.is_sparse_attention:
        raise TrainConfigError(
            "training deepseek_v32 is not supported yet: its lightning indexer is trained with a "
            "KL loss against dense attention (DeepSeek-V3.2 §2.1.1), which the trainer does not "
            "compute; fine-tune a deepseek_v3 model, or run deepseek_v32 for inference"
        )


def check_context(row_len: int, max_positions: int | None, data_format: str) -> None:
    """Refuse training sequences longer than the model's context: a row (or chat example) of
    ``row_len`` tokens feeds ``row_len - 1`` input positions.

    Raises:
        TrainConfigError: ``row_len - 1 > max_positions``.
    """
    if max_positions and row_len - 1 > max_positions:
        where = "the shards' seq_len (manifest.json)" if data_format == "shards" else "data.seq_len"
        raise TrainConfigError(
            f"{where} {row_len} needs {row_len - 1} positions but the model's "
            f"max_position_embeddings is {max_positions}; use at most {max_positions + 1}"
        )


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns the model, data, optimizer and schedule of one run; :meth:`fit` runs it.

    Args:
        cfg: the validated :class:`~deepwhale.train.config.TrainConfig`.

    Raises:
        TrainConfigError, DataError, ShardError, ConfigError, CheckpointError, LoraError: bad
            settings or inputs, each with a message naming the key or file.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self._fault = recovery.FaultInjection.from_env()
        rdzv_start, rdzv_end = self._rendezvous_times()
        self._clock = recovery.RecoveryClock(
            heartbeat=recovery.read_heartbeat(self.out) if self.is_main else None,
            process_start=recovery.process_start_time(),
            rendezvous_start=rdzv_start,
            rendezvous_end=rdzv_end,
        )
        self.device = self._device()
        precision = cfg.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        seed_everything(cfg.train.seed)
        self._tokenizer = None
        self._data_tokenizer: str | None = None
        self._model_folder: Path | None = None
        name_path = Path(cfg.model.name)
        if name_path.is_dir():
            self._model_folder = name_path

        data = build_datasets(cfg.data, self.tokenizer)
        self.data_format = data.format
        self.train_ds, self.val_ds, self.pad_id = data.train, data.val, data.pad_id
        self.dropped = data.dropped
        self._data_tokenizer = data.tokenizer
        model, self._model_folder = build_model(cfg.model, cfg.train.seed, data.vocab_size)
        check_vocab(self.train_ds, model.config.vocab_size, Path(cfg.data.path))
        check_context(data.row_len, model.config.max_position_embeddings, self.data_format)
        self.config = model.config
        if (
            self.data_format == "shards"
            and self.tokenizer_folder is None
            and cfg.checkpoint.save_final
        ):
            recorded = self._data_tokenizer
            why = (
                f"the manifest records tokenizer {recorded!r}, which was not found from "
                f"{Path.cwd()} nor next to the shards"
                if recorded
                else "the manifest records no tokenizer"
            )
            log.warning(
                "%s: %s; final/ will have no tokenizer files (set model.tokenizer)",
                cfg.data.path,
                why,
            )
        if self._model_folder is None and self.tokenizer_folder is not None:
            # a random init takes its special ids from the tokenizer it is trained with, so the
            # saved config.json agrees with tokenizer_config.json (transformers stops on it)
            tok = self.tokenizer()
            if tok.bos_token_id is not None:
                self.config.bos_token_id = tok.bos_token_id
            if tok.eos_token_id is not None:
                self.config.eos_token_id = tok.eos_token_id
        self.model = model
        if cfg.lora.enabled:
            from deepwhale.lora import apply_lora

            self.model = apply_lora(
                model,
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                target_modules=cfg.lora.target_modules,
                lora_dropout=cfg.lora.dropout,
                verbose=not cfg.log.quiet,
            )
        self.model.to(self.device).train()
        self._parallelize()

        # MoE balancing
        self.aux_alpha = (
            cfg.moe.aux_loss_alpha
            if cfg.moe.aux_loss_alpha is not None
            else float(self.config.aux_loss_alpha or 0.0)
        )
        self.seq_aux = cfg.moe.seq_aux if cfg.moe.seq_aux is not None else self.config.seq_aux
        self.bias_gamma = 0.0 if cfg.lora.enabled else cfg.moe.bias_update_speed
        self.monitor = None
        if self.config.n_routed_experts:
            from deepwhale.train.moe import RouterMonitor

            self.monitor = RouterMonitor(self.model, record_scores=self.aux_alpha > 0)

        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
        )
        self.params = params
        self.schedule = schedule_from_config(cfg)
        self.sampler = EpochSampler(len(self.train_ds), cfg.train.seed)
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: Path | None = None
        self._resume()

    # ------------------------------------------------------------------ setup helpers
    @property
    def rank(self) -> int:
        """This process's global rank (0 on one process)."""
        return 0

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes the run's shared files (rank 0)."""
        return True

    def _rendezvous_times(self) -> tuple[float, float]:
        """Wall times (s since the epoch) around process-group init; on one process there is
        none, so both are now."""
        now = time.time()
        return now, now

    def _device(self) -> torch.device:
        """The device to train on (``train.device``); the parallel trainer picks its rank's."""
        return resolve_device(self.cfg.train.device)

    def _parallelize(self) -> None:
        """Apply plans to ``self.model``: on one process only activation checkpointing and
        compile (``train.activation_checkpointing``, ``train.compile``)."""
        self._checkpoint_and_compile(self.model)

    def _checkpoint_and_compile(self, model) -> None:
        """Activation checkpointing, then ``torch.compile``, of ``model``'s decoder layers
        (:mod:`deepwhale.train.ac_compile`).

        Raises:
            TrainConfigError: an unknown ``train.compile_backend``.
        """
        from deepwhale.train.ac_compile import apply_activation_checkpointing, apply_compile

        t = self.cfg.train
        apply_activation_checkpointing(
            model, t.activation_checkpointing, t.ac_every, compiled=t.compile
        )
        if t.compile:
            try:
                apply_compile(model, t.compile_backend)
            except ValueError as e:
                raise TrainConfigError(f"train.{e}") from None

    def tokenizer(self):
        """The tokenizer for text/chat data (see ``model.tokenizer``), loaded on first use.

        Raises:
            TokenizerError: a folder without a usable ``tokenizer.json``.
        """
        if self._tokenizer is None:
            from deepwhale.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_pretrained(self.tokenizer_folder)
        return self._tokenizer

    @property
    def tokenizer_folder(self) -> Path | None:
        """Where the tokenizer files come from: ``model.tokenizer``, else the model folder, else
        (for shards) the folder the shard manifest records, else the bundled stories260K for
        text data; None for shards without a recorded tokenizer."""
        if self.cfg.model.tokenizer:
            return Path(self.cfg.model.tokenizer)
        if self._model_folder is not None and (self._model_folder / "tokenizer.json").exists():
            return self._model_folder
        if self.cfg.data.format == "shards" or (
            self.cfg.data.path and Path(self.cfg.data.path).is_dir()
        ):
            recorded = self._data_tokenizer  # the pipeline writes it into the manifest
            if recorded and (Path(recorded) / "tokenizer.json").exists():
                return Path(recorded)
            return None
        return BUNDLED_TOKENIZER

    def _resume(self) -> None:
        """Apply ``checkpoint.resume`` (see :meth:`_resume_folder`) and time the load for the
        recovery report.

        Raises:
            CheckpointNotFound: a named folder that is missing or incomplete.
            NoUsableCheckpoint: ``auto`` found step-N folders but none is complete.
            TrainConfigError: the checkpoint is past ``train.steps``.
        """
        folder = self._resume_folder()
        if folder is None:
            return
        self._clock.load_start = time.time()
        self.load_checkpoint(folder)
        self._clock.load_end = time.time()
        if self.step > self.cfg.train.steps:
            raise TrainConfigError(
                f"{folder}: the checkpoint is at step {self.step}, past train.steps="
                f"{self.cfg.train.steps}; raise train.steps to continue it, or use a new out_dir "
                "(or checkpoint.resume=none) to start over"
            )

    def _resume_folder(self) -> Path | None:
        """The checkpoint to resume from, or None for a fresh start.

        ``checkpoint.resume``: ``none``, a folder, or ``auto``: the newest complete checkpoint
        under ``out_dir/checkpoints``. Step-N folders newer than it (half-written, truncated)
        are skipped with a warning naming the bad file. A process restarted by torchrun
        (``TORCHELASTIC_RESTART_COUNT`` > 0) always resumes as ``auto`` (a named folder is
        still used when ``out_dir`` has no checkpoint yet), so a job under ``--max-restarts``
        continues from its newest checkpoint after a worker dies.

        Raises:
            NoUsableCheckpoint: ``auto`` found step-N folders but none is complete (one line,
                naming each and why).
        """
        mode = self.cfg.checkpoint.resume
        restarts = recovery.restart_count()
        named = None if mode in ("none", "auto") else Path(mode)
        if restarts > 0 and mode != "auto":
            log.warning(
                "restart %d of this torchrun job: checkpoint.resume=%s taken as auto (the newest "
                "complete checkpoint in %s)",
                restarts,
                mode,
                self.out,
            )
            mode = "auto"
        if mode == "none":
            return None
        if mode != "auto":
            return Path(mode)
        root = self.out / "checkpoints"
        folder = ckpt.latest_checkpoint(root)
        newest = int(ckpt.STEP_DIR.match(folder.name).group(1)) if folder else -1
        skipped = [
            (p, ckpt.checkpoint_problem(p))
            for p in (sorted(root.iterdir()) if root.is_dir() else [])
            if (m := ckpt.STEP_DIR.match(p.name)) and int(m.group(1)) > newest
        ]
        for p, why in skipped:
            log.warning("resume auto: skipping %s (incomplete or truncated checkpoint: %s)", p, why)
        if folder is None:
            if named is not None:
                return named
            if skipped:
                raise ckpt.NoUsableCheckpoint(
                    f"resume auto: no usable checkpoint under {root} ("
                    + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                    + "); restore or remove them, or set checkpoint.resume=none to start over"
                )
            return None  # auto with nothing to resume: a fresh start
        return folder

    def _model_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if not self.cfg.lora.enabled:
            return state
        keep = {n for n, p in self.model.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in self.model.named_buffers()}
        return {k: v for k, v in state.items() if k in keep}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint of the current step (see :mod:`deepwhale.train.checkpoint`)."""
        state = {
            "sampler": self.sampler.state_dict(),
            "tokens_seen": self.tokens_seen,
            "schedule": self.schedule.state_dict(),
            "config": self.cfg.to_dict(),
        }
        return ckpt.save_checkpoint(
            self.out / "checkpoints",
            self.step,
            self._model_state(),
            self.optimizer.state_dict(),
            state,
            self.cfg.checkpoint.keep_last,
        )

    def load_checkpoint(self, folder: Path) -> None:
        """Restore model, optimizer, data position, counters and RNG states from ``folder``.

        Raises:
            CheckpointNotFound: missing or incomplete folder.
            DataError: the dataset changed size since the checkpoint.
        """
        from deepwhale.parallel.checkpoint import is_dcp

        if is_dcp(Path(folder)):  # saved by a parallel run: DCP reshards it onto one process
            self._load_dcp(Path(folder))
            return
        data = ckpt.load_checkpoint(Path(folder))
        try:
            missing, unexpected = self.model.load_state_dict(data["model"], strict=False)
        except RuntimeError as e:  # shape mismatch: another model's checkpoint
            raise ckpt.CheckpointNotFound(
                f"{folder}: checkpoint does not match this model ({str(e).splitlines()[-1]})"
            ) from None
        if unexpected or (missing and not self.cfg.lora.enabled):
            raise ckpt.CheckpointNotFound(
                f"{folder}: checkpoint does not match this model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.optimizer.load_state_dict(data["optimizer"])
        state = data["state"]
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        ckpt.set_rng_state(data["rng"])
        self.resumed_from = Path(folder)

    def _load_dcp(self, folder: Path) -> None:
        """Resume a single process from a distributed checkpoint (any layout)."""
        from deepwhale.parallel.checkpoint import load_dcp

        if self.cfg.lora.enabled:
            raise ckpt.CheckpointNotFound(f"{folder}: a distributed checkpoint cannot resume LoRA")
        state = load_dcp(folder, self.model, self.optimizer)["state"]
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.resumed_from = Path(folder)

    # ------------------------------------------------------------------ one step
    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum`` micro-batches of the next optimizer step (advances the sampler)."""
        t = self.cfg.train
        return [
            collate([self.train_ds[i] for i in self.sampler.take(t.micro_batch_size)], self.pad_id)
            for _ in range(t.grad_accum)
        ]

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward_window(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward and backward every micro-batch of one accumulation window.

        The loss of micro-batch ``j`` is ``sum_t CE_t / N`` with ``N`` the label tokens of the
        whole window, so the accumulated gradient equals that of the window's mean token loss.
        The MoE balance loss is divided by the window's sequences (``seq_aux``) or micro-batches.

        Returns:
            ``{"loss": mean token loss of the window (nats), "aux_loss"}`` as 0-d tensors on the
            device (not synced) and ``"tokens"``: label tokens (int).
        """
        n_tokens = int(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))
        n_seqs = sum(b["input_ids"].shape[0] for b in batches)
        denom = max(n_tokens, 1)
        # accumulate on the device: one host sync per step (in train_step), not per micro-batch
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for b in batches:
            ids = b["input_ids"].to(self.device, non_blocking=True)
            labels = b["labels"].to(self.device, non_blocking=True)
            mask = b["mask"].to(self.device, non_blocking=True)
            if self.monitor is not None:
                self.monitor.clear()
            with self._autocast():
                logits = self.model(ids)  # (B, T, V)
            loss = token_cross_entropy_sum(logits, labels) / denom
            total = loss
            if self.monitor is not None:
                if self.aux_alpha > 0:
                    aux = self.monitor.aux_loss(mask, self.aux_alpha, self.seq_aux)
                    aux = aux / (n_seqs if self.seq_aux else len(batches))
                    total = total + aux
                    aux_sum += aux.detach()
                if self.bias_gamma > 0:
                    self.monitor.add_loads(mask)
                self.monitor.clear()
            total.backward()
            loss_sum += loss.detach()
        return {"loss": loss_sum, "aux_loss": aux_sum, "tokens": n_tokens}  # tensors

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns ``{"step", "loss", "lr", "grad_norm", "tokens",
        "aux_loss", "expert_imbalance"}`` (``step`` counts completed steps)."""
        lr = self.schedule.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        metrics = self.backward_window(self.next_batches())
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance = self.monitor is not None and self.bias_gamma > 0
        imbalance = metrics["loss"]
        if balance:
            imbalance = self.monitor.update_bias(self.bias_gamma)
        self.step += 1
        self.tokens_seen += metrics["tokens"]
        loss, aux, norm, imbalance = torch.stack(
            [metrics["loss"], metrics["aux_loss"], grad_norm, imbalance.to(metrics["loss"])]
        ).tolist()  # the one host sync of the step
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens": metrics["tokens"],
            "aux_loss": aux if self.aux_alpha > 0 else None,
            "expert_imbalance": imbalance if balance else None,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean token loss and perplexity over the first ``eval.max_batches`` validation
        micro-batches (in order, no shuffling); ``{}`` without a validation set."""
        if self.val_ds is None:
            return {}
        self.model.eval()
        if self.monitor is not None:
            self.monitor.enabled = False
        mbs = self.cfg.train.micro_batch_size
        loss, tokens = 0.0, 0
        for j in range(self.cfg.eval.max_batches):
            idx = list(range(j * mbs, min((j + 1) * mbs, len(self.val_ds))))
            if not idx:
                break
            b = collate([self.val_ds[i] for i in idx], self.pad_id)
            labels = b["labels"].to(self.device)
            with self._autocast():
                logits = self.model(b["input_ids"].to(self.device))
            loss += float(token_cross_entropy_sum(logits, labels))
            tokens += int((labels != IGNORE_INDEX).sum())
        self.model.train()
        if self.monitor is not None:
            self.monitor.enabled = True
        mean = loss / max(tokens, 1)
        return {"val_loss": mean, "val_ppl": perplexity(mean)}

    # ------------------------------------------------------------------ the run
    def fit(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train until ``train.steps`` (or, to simulate an interruption, until step ``max_steps``).

        Logs every ``log.interval`` steps, evaluates every ``eval.interval`` steps and at the end,
        checkpoints every ``checkpoint.interval`` steps, and at the end writes ``final/`` (or
        ``adapter/`` under LoRA).

        A run resumed from a checkpoint at exactly ``train.steps`` (a finished run restarted, as
        a scheduler does after preemption) has nothing to do: it logs that and returns ``[]``
        without rewriting ``final/`` (which is written only if it is missing).

        Returns:
            One metrics dict per optimizer step run by this call.
        """
        cfg = self.cfg
        if self.resumed_from is not None and self.step >= cfg.train.steps:
            final = self.out / ("adapter" if cfg.lora.enabled else "final")
            done = final.exists() or not cfg.checkpoint.save_final
            log.warning(
                "%s is at step %d = train.steps; nothing to train%s (raise train.steps to continue)",
                self.resumed_from,
                self.step,
                f", {final} kept as is" if done else f", writing {final}",
            )
            if not done:
                self.save_final()
            return []
        self.out.mkdir(parents=True, exist_ok=True)
        stop = cfg.train.steps if max_steps is None else min(max_steps, cfg.train.steps)
        logger = MetricsLogger(self.out, cfg.log.csv, cfg.log.tensorboard, self.step)
        bar = Progress(cfg.train.steps, self.step, cfg.log.quiet)
        if self.resumed_from is not None:
            bar.print(f"resumed from {self.resumed_from} at step {self.step}")
        history: list[dict[str, Any]] = []
        t_last, tokens_since = time.perf_counter(), 0
        try:
            while self.step < stop:
                if self._fault is not None:
                    self._fault.maybe_kill(self.rank, self.step + 1)
                m = self.train_step()
                history.append(m)
                self._after_step(len(history) == 1)
                tokens_since += m["tokens"]
                now = time.perf_counter()
                m["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                info = f"loss {m['loss']:.4f} lr {m['lr']:.2e}"
                last = self.step == cfg.train.steps
                if cfg.eval.interval and self.step % cfg.eval.interval == 0 or last:
                    m.update(self.evaluate())
                    if "val_loss" in m:
                        bar.print(
                            f"step {self.step}: val loss {m['val_loss']:.4f} ppl {m['val_ppl']:.2f}"
                        )
                if self.step % cfg.log.interval == 0 or last or "val_loss" in m:
                    logger.log(m)
                    t_last, tokens_since = now, 0
                bar.update(self.step, info)
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save_checkpoint()
            self.wait_for_checkpoints()
            if self.step >= cfg.train.steps and cfg.checkpoint.save_final:
                where = self.save_final()
                bar.print(f"saved {where}")
        finally:
            bar.close()
            logger.close()
        return history

    def _after_step(self, first: bool) -> None:
        """Rank 0: write the heartbeat; after the first step of a resumed or restarted process,
        log the recovery line and write ``recovery.json`` (:mod:`deepwhale.train.recovery`)."""
        if not self.is_main:
            return
        recovery.write_heartbeat(self.out, self.step)
        if first and (self.resumed_from is not None or recovery.restart_count() > 0):
            rec = self._clock.report(self.step - 1, self.resumed_from, time.time())
            recovery.write_recovery(self.out, rec)
            log.warning("%s", recovery.describe(rec))

    def wait_for_checkpoints(self) -> None:
        """Block until checkpoints being written in the background are complete (the
        single-process trainer writes them synchronously: nothing to wait for)."""

    def save_final(self) -> Path:
        """Write ``out_dir/final`` (an HF folder: config, safetensors, tokenizer files), or under
        LoRA ``out_dir/adapter`` (PEFT format). Returns the folder."""
        from deepwhale.checkpoint.io import save_model
        from deepwhale.lora import copy_tokenizer_files, save_adapter

        if self.cfg.lora.enabled:
            return save_adapter(self.model, self.out / "adapter", base_model=self._model_folder)
        folder = self.out / "final"
        save_model(self.model, folder)
        src = self.tokenizer_folder
        if src is not None:
            copy_tokenizer_files(src, folder)
        return folder
