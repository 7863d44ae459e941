"""The training loop under ``torchrun``: the single-process :class:`~deepwhale.train.trainer.Trainer`
with parallel plans applied to its model from outside.

Plans are applied in torchtitan's order: pipeline split (each rank keeps its stage), TP (+SP),
EP, activation checkpointing, compile (:mod:`deepwhale.train.ac_compile`), then FSDP2
(``dp_shard``, HSDP with ``dp``) or DDP (``dp`` alone). Equivalence with one process
is the design rule:

* **Data.** All ranks run the same seeded sampler. A step's window is ``grad_accum`` global
  micro-batches of ``micro_batch_size x (dp x dp_shard)`` sequences; data-parallel rank ``d``
  takes sequences ``[d*mbs, (d+1)*mbs)`` of each (TP and PP peers take the same ones), so the
  window is exactly the one-process window of ``micro_batch_size x dp_degree`` sequences.
  ``train.micro_batch_size`` is therefore *per data-parallel rank*.
* **Loss.** Each rank's loss is ``sum of its token CEs / N x dp_degree``, ``N`` the label tokens of
  the whole global window (every rank counts them from the sampler's ids, no collective), so the
  data-parallel mean that DDP/FSDP2 apply gives the one-process gradient of the window's mean
  token loss. The logged loss is summed over data-parallel ranks.
* **Clipping.** The global gradient norm is assembled from DTensor norms (TP/FSDP shards),
  expert shards (summed over the EP group) and pipeline stages (summed over ``pp``), then every
  gradient is scaled by ``min(1, max_norm / (norm + 1e-6))`` as ``clip_grad_norm_`` does.
* **MoE.** Router loads are summed over the data-parallel ranks before the DeepSeek-V3 bias
  update, so every replica applies the same update as one process would.

Checkpoints are DCP (:mod:`deepwhale.parallel.checkpoint`): sharded, resumable bit for bit on
the same layout and reshardable to another layout or to one process; written in the background
under ``checkpoint.async_save``. Under ``torchrun --max-restarts`` a restarted worker resumes from
the newest complete checkpoint (rank 0 chooses it and broadcasts it) and rank 0 reports how long
the recovery took (:mod:`deepwhale.train.recovery`).

This module stays whole (about 870 lines) because :class:`ParallelTrainer` is the one place
where the plans are applied in their fixed order and the equivalence rules above meet, which is
only checkable when read together; the plans themselves live in ``tp``, ``ep``, ``pp``,
``checkpoint`` and ``compression``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from deepwhale.parallel import checkpoint as pckpt
from deepwhale.parallel.runtime import Runtime
from deepwhale.parallel.tp import loss_context
from deepwhale.train import checkpoint as ckpt
from deepwhale.train.ac_compile import is_recomputing
from deepwhale.train.data import IGNORE_INDEX, collate
from deepwhale.train.loss import token_cross_entropy_sum
from deepwhale.train.trainer import Trainer

log = logging.getLogger(__name__)


def _local(t):
    """A DTensor's full value (replicated scalars), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class ParallelTrainer(Trainer):
    """:class:`~deepwhale.train.trainer.Trainer` for one rank of a ``torchrun`` job.

    Args:
        cfg: the run's :class:`~deepwhale.train.config.TrainConfig` (rank 0 logs; other ranks
            are quiet and write no metrics files).
        runtime: from :func:`deepwhale.parallel.runtime.init_runtime`.

    Raises:
        Everything :class:`Trainer` raises; ``LayoutError`` for unsupported combinations.
    """

    def __init__(self, cfg, runtime: Runtime) -> None:
        self.rt = runtime
        self.layout = runtime.layout
        if not runtime.is_main:  # one rank logs; the others only compute
            cfg = dataclasses.replace(
                cfg, log=dataclasses.replace(cfg.log, quiet=True, csv=False, tensorboard=False)
            )
        self._ddp = None
        self._fsdp = False
        self._window_tokens = 0
        self.compression = None
        self._moe_use: list = []  # (MoE module, per-expert token counts) under FSDP2
        self._pending = None  # the checkpoint being written in the background
        self._ckpt_group = None  # the gloo group of async saves (created on first use)
        self._memory = None
        self.comm = None  # a StepRecorder under DEEPWHALE_COUNT_COMM=1 (comm_counter)
        self._counter = counter = self._start_counting()
        super().__init__(cfg)
        if counter is not None:
            from deepwhale.parallel.comm_counter import StepRecorder

            lay = self.layout
            dims = {
                "dp": lay.dp,
                "dp_shard": lay.dp_shard,
                "tp": lay.tp,
                "pp": lay.pp,
                "ep": lay.ep,
            }
            meta = {
                "rank": runtime.rank,
                "world_size": runtime.world_size,
                "pp_rank": runtime.pp_rank,
                "layout": dataclasses.asdict(lay),
                "dims": dims,
                "model": dataclasses.asdict(self.config),
                "micro_batch_size": cfg.train.micro_batch_size,
                "grad_accum": cfg.train.grad_accum,
                "seq_len": int(self.train_ds[0][0].shape[0]),
            }
            path = self.out / "comm" / f"rank{runtime.rank}.json"
            self.comm = StepRecorder(counter, path, meta)

    # ------------------------------------------------------------------ setup
    @property
    def rank(self) -> int:
        return self.rt.rank

    @property
    def is_main(self) -> bool:
        return self.rt.is_main

    def _rendezvous_times(self) -> tuple[float, float]:
        return self.rt.init_started, self.rt.init_started + self.rt.init_s

    def _resume_folder(self) -> Path | None:
        """Rank 0 chooses the checkpoint (:meth:`Trainer._resume_folder`, its warnings logged
        once) and broadcasts it, so every rank loads the same folder even if a save finishes
        while they look. A folder appears only complete (``state.json`` written last, then an
        atomic rename), so a save cut short by the crash is never chosen.

        Raises:
            NoUsableCheckpoint: on every rank when rank 0 found none usable (only rank 0's
                message is printed).
        """
        choice: list = [None]
        if self.rt.is_main:
            try:
                folder = super()._resume_folder()
                choice = [("ok", None if folder is None else str(folder))]
            except ckpt.NoUsableCheckpoint as e:
                choice = [("none", str(e))]
        dist.broadcast_object_list(choice, src=0)
        kind, value = choice[0]
        if kind == "none":
            raise ckpt.NoUsableCheckpoint(value)
        return None if value is None else Path(value)

    def _start_counting(self):
        """Under ``DEEPWHALE_COUNT_COMM=1``: install a
        :class:`~deepwhale.parallel.comm_counter.CommCounter` (before any plan is applied, so
        pipeline P2P ops see the wrapped functions) with this run's groups labelled by mesh
        dimension; else None."""
        from deepwhale.parallel import comm_counter

        if not comm_counter.enabled():
            return None
        rt, lay = self.rt, self.layout
        counter = comm_counter.CommCounter()
        if os.environ.get(comm_counter.ENV) == "trace":
            counter.trace = []
        # the flattened data-parallel group: DDP, the loss and validation sums
        counter.label(
            rt.dp_group, "dp" if lay.dp_shard == 1 else "dp_shard" if lay.dp == 1 else "dp_all"
        )
        counter.label(rt.sub("dp_replicate"), "dp")
        counter.label(rt.sub("dp_shard"), "dp_shard")
        counter.label(rt.tp_mesh, "tp")
        counter.label(rt.pp_mesh, "pp")
        counter.label(rt.ep_group, "ep")
        counter.label(rt.ep_outer_group, "ep_outer")
        return counter.install()

    def _device(self) -> torch.device:
        return self.rt.device

    def _parallelize(self) -> None:
        """TP -> EP -> activation checkpointing -> compile -> FSDP2 / DDP on ``self.model``;
        keeps the unwrapped module as ``inner``."""
        lay, rt = self.layout, self.rt
        model = self.model
        self.inner = model
        self._expert_params = []
        if lay.pp > 1:
            self._build_pipeline()
            return
        if lay.tp > 1:
            from deepwhale.parallel.tp import apply_tensor_parallel

            apply_tensor_parallel(model, rt.tp_mesh, lay.sequence_parallel)
        if lay.ep > 1:
            self._apply_ep(model)
        self._checkpoint_and_compile(model)
        if lay.dp_shard > 1 or (lay.dp > 1 and lay.tp > 1):
            self._apply_fsdp(model)
        elif lay.dp > 1:
            self._apply_ddp(model)
        if rt.is_main and not self.cfg.log.quiet:
            print(f"parallel: {rt.describe()}", flush=True)

    def _apply_ep(self, model) -> None:
        """Shard the routed experts of ``model`` (the whole model, or one pipeline stage) over
        the EP group; their parameters stay outside DDP/FSDP (:meth:`_sync_expert_grads`)."""
        from deepwhale.model.moe import MoE
        from deepwhale.parallel.ep import apply_expert_parallel, expert_parameter_names

        if not any(isinstance(m, MoE) for m in model.modules()):
            return  # a pipeline stage of dense layers only
        apply_expert_parallel(model, self.rt.ep_group)
        names = expert_parameter_names(model)
        self._expert_params += [p for n, p in model.named_parameters() if n in names]

    def _build_pipeline(self) -> None:
        """Cut the model into this rank's pipeline stage(s), apply TP / FSDP2 to each stage, and
        build the schedule; ``self.model`` becomes a module holding exactly this rank's parts
        (single-device FQNs) for the optimizer, the router monitor and checkpoints."""
        from deepwhale.parallel.layout import LayoutError
        from deepwhale.parallel.pp import build_pipeline

        lay, rt = self.layout, self.rt
        if self.data_format == "chat":
            raise LayoutError(
                "parallel.pp > 1 needs rows of one length (packed text or shards); chat data is "
                "padded per batch — train it with dp/dp_shard/tp"
            )
        t = self.cfg.train
        n_mb = lay.microbatches or t.grad_accum
        rows = t.micro_batch_size * t.grad_accum
        seq = self.train_ds[0][0].shape[0]

        def parallelize(stage) -> None:
            if lay.tp > 1:
                from deepwhale.parallel.tp import apply_tensor_parallel

                apply_tensor_parallel(stage, rt.tp_mesh, lay.sequence_parallel)
                if lay.sequence_parallel:
                    stage.seq_shards = lay.tp
            if lay.ep > 1:
                self._apply_ep(stage)
            self._checkpoint_and_compile(stage)
            if lay.dp_degree > 1:
                self._apply_fsdp(stage)

        self.pp_loss = _TokenLoss(lay.tp > 1)
        self.stages, self.pp_schedule = build_pipeline(
            self.inner,
            rt.pp_mesh.get_group(),
            lay,
            self.device,
            self.pp_loss,
            n_mb,
            batch_shape=None if lay.tp > 1 else (rows, seq),
            parallelize=parallelize,
        )
        self.model = _RankModule(self.stages)
        self._pp_rows = rows
        self._pp_aux = torch.zeros((), device=self.device)
        self._pp_hooks_installed = False
        self._pp_calls: dict[int, list] = {}  # MoE layer -> (loads, aux) per forward call

    def _install_pp_moe_hooks(self) -> None:
        """Under PP the loss is computed inside the schedule, so each MoE layer adds its balance
        loss to the graph itself (an identity on its output whose backward feeds the loss's
        gradient, as Megatron-LM's MoE aux-loss scaler does) and counts its router loads."""
        if self._pp_hooks_installed or self.monitor is None:
            return
        self._pp_hooks_installed = True
        from deepwhale.model.moe import MoE

        index = {id(g): i for i, g in enumerate(self.monitor.gates)}
        for mod in self.model.modules():
            if isinstance(mod, MoE):
                mod.register_forward_hook(self._pp_moe_hook(index[id(mod.gate)]))

    def _pp_moe_hook(self, i: int):
        def hook(mod, args, out):
            mon = self.monitor
            if not mon.enabled or i not in mon._outputs:
                return None
            x = args[0]
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # full rows
            counts = aux = None
            if self.bias_gamma > 0:
                indices = mon._outputs[i][0]
                counts = torch.bincount(indices.flatten(), minlength=mon.gates[i].n_experts)
            if self.aux_alpha > 0:
                term = mon.layer_balance_term(i, mask, self.seq_aux) * self.aux_alpha
                aux = term / self._pp_aux_denom
            mon._outputs.pop(i)
            if not is_recomputing():  # a checkpointed layer's replay must not count twice
                entry = (counts, None if aux is None else aux.detach())
                self._pp_calls.setdefault(i, []).append(entry)
            if aux is None:
                return None
            return _AttachLoss.apply(out, aux * self.layout.dp_degree)

        return hook

    def _pp_window_router_stats(self, n_mb: int) -> None:
        """Add the window's router loads and balance loss from the last ``n_mb`` forward calls of
        each MoE layer: on the first step torch's pipelining runs one more forward per stage to
        infer the activations' metadata (on real or uninitialised inputs), which must not count."""
        mon = self.monitor
        for i, calls in self._pp_calls.items():
            for counts, aux in calls[-n_mb:]:
                if counts is not None:
                    mon.loads[i] = mon.loads[i].to(counts.device) + counts.double()
                if aux is not None:
                    self._pp_aux += aux
        self._pp_calls = {}

    def _apply_fsdp(self, model) -> None:
        from torch.distributed.fsdp import fully_shard

        lay = self.layout
        mesh = self.rt.sub("dp_replicate", "dp_shard") if lay.dp > 1 else self.rt.sub("dp_shard")
        ignored = set(self._expert_params) or None
        stack = model.model
        layers = stack.layers.values() if hasattr(stack.layers, "values") else stack.layers
        for layer in layers:
            fully_shard(layer, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        self._fsdp = True
        if self.config.n_routed_experts and not self._expert_params:
            self._track_expert_use(model)

    def _track_expert_use(self, root) -> None:
        """FSDP2 reduce-scatters the gradients a rank has, so every rank must hold a gradient
        for every routed expert (else the collectives differ in size). A forward hook adds
        ``0 * w[0]`` of each expert weight to the MoE output, so experts without tokens on a rank
        get exact zeros there; after backward, :meth:`_drop_unused_expert_grads` sets the
        gradients of experts no data-parallel rank routed to back to None, as one process has
        them (AdamW then skips them: no weight decay, no moment update)."""
        from deepwhale.model.moe import MoE

        for mod in root.modules():
            if not isinstance(mod, MoE):
                continue
            use = torch.zeros(len(mod.experts), dtype=torch.int64, device=self.device)
            self._moe_use.append((mod, use))

            def count(gate, args, out, use=use):
                if is_recomputing():
                    return
                use.add_(torch.bincount(out[1].flatten(), minlength=len(use)))

            def touch(moe, args, out):
                first = [p.reshape(-1)[0] for p in moe.experts.parameters()]
                return out + torch.stack(first).sum().to(out.dtype) * 0.0

            mod.gate.register_forward_hook(count)
            mod.register_forward_hook(touch)

    def _drop_unused_expert_grads(self) -> None:
        """See :meth:`_track_expert_use`: one all-reduce of the per-expert token counts over
        the data-parallel ranks; experts with none lose their (zero) gradient."""
        uses = self._moe_use
        if not uses:
            return
        flat = torch.cat([u for _, u in uses])
        dist.all_reduce(flat, group=self.rt.dp_group)
        for (mod, use), total in zip(uses, flat.split([len(u) for _, u in uses]), strict=True):
            for e in (total == 0).nonzero().flatten().tolist():
                for q in mod.experts[e].parameters():
                    q.grad = None
            use.zero_()

    def _apply_ddp(self, model) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self._expert_params:
            ids = {id(p) for p in self._expert_params}
            names = [n for n, p in model.named_parameters() if id(p) in ids]
            DDP._set_params_and_buffers_to_ignore_for_model(model, names)
        # routed experts that get no token on a rank have no gradient there
        moe = bool(self.config.n_routed_experts)
        self._ddp = DDP(
            model,
            process_group=self.rt.dp_group,
            broadcast_buffers=False,
            find_unused_parameters=moe,
        )
        self.model = self._ddp
        gc = self.layout.grad_compression
        if gc.method != "none":
            from deepwhale.parallel.compression import register_compression

            self.compression = register_compression(self._ddp, gc, self.rt.dp_group)
        elif self._counter is not None:
            # DDP's built-in all-reduce runs in C++, out of the counter's sight: torch's Python
            # allreduce_hook computes the same average through dist.all_reduce
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            self._ddp.register_comm_hook(self.rt.dp_group, default_hooks.allreduce_hook)

    # ------------------------------------------------------------------ data
    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next window (see the module docstring); also counts
        the label tokens of the whole global window."""
        t, lay = self.cfg.train, self.layout
        mbs, dp, d = t.micro_batch_size, lay.dp_degree, self.rt.dp_rank
        batches, tokens = [], 0
        for _ in range(t.grad_accum):
            ids = self.sampler.take(mbs * dp)
            samples = [self.train_ds[i] for i in ids]
            tokens += int(sum(int((np.asarray(y) != IGNORE_INDEX).sum()) for _, y in samples))
            batches.append(self._pad(collate(samples[d * mbs : (d + 1) * mbs], self.pad_id)))
        self._window_tokens = tokens
        return batches

    def _pad(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Right-pad the time dim to a multiple of ``tp`` under sequence parallelism (padding is
        masked from the loss and, being on the right, changes no real token's logits)."""
        tp = self.layout.tp
        t = b["input_ids"].shape[1]
        if tp == 1 or not self.layout.sequence_parallel or t % tp == 0:
            return b
        extra = tp - t % tp
        return {
            "input_ids": F.pad(b["input_ids"], (0, extra), value=self.pad_id),
            "labels": F.pad(b["labels"], (0, extra), value=IGNORE_INDEX),
            "mask": F.pad(b["mask"], (0, extra), value=False),
        }

    # ------------------------------------------------------------------ one step
    def _ce_sum(self, logits, labels):
        """Summed token cross-entropy; ``logits`` may be vocabulary-sharded (loss parallel)."""
        return token_cross_entropy_sum(logits, labels)

    def _pipeline_window(self, batches):
        """One window through the pipeline schedule (forward and backward of all microbatches)."""
        from deepwhale.parallel.pp import pipeline_step

        lay = self.layout
        self._install_pp_moe_hooks()
        ids = torch.cat([b["input_ids"] for b in batches]).to(self.device)  # (rows, T)
        labels = torch.cat([b["labels"] for b in batches]).to(self.device)
        scale = float(lay.dp_degree)
        self.pp_loss.denom = max(self._window_tokens, 1) / scale
        n_mb = lay.microbatches or self.cfg.train.grad_accum
        n_seqs = ids.shape[0] * lay.dp_degree
        self._pp_aux_denom = n_seqs if self.seq_aux else n_mb * lay.dp_degree
        self._pp_aux = torch.zeros((), device=self.device)
        if self.monitor is not None:
            self.monitor.clear()
        self._pp_calls = {}
        with loss_context(lay.tp > 1):
            loss = pipeline_step(self.pp_schedule, self.stages, ids, labels, train=True)
        if self.monitor is not None:
            self.monitor.clear()
            self._pp_window_router_stats(n_mb)
        loss = torch.zeros((), device=self.device) if loss is None else loss / scale
        return {"loss": loss, "aux_loss": self._pp_aux.clone(), "tokens": self._window_tokens}

    def backward_window(self, batches):
        """Forward/backward of this rank's micro-batches (see the module docstring)."""
        lay = self.layout
        if lay.pp > 1:
            return self._pipeline_window(batches)
        denom = max(self._window_tokens, 1)
        scale = float(lay.dp_degree)
        n_seqs = sum(b["input_ids"].shape[0] for b in batches) * lay.dp_degree
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        tp = lay.tp > 1
        for j, b in enumerate(batches):
            last = j == len(batches) - 1
            ids = b["input_ids"].to(self.device)
            labels = b["labels"].to(self.device)
            mask = b["mask"].to(self.device)
            if self._fsdp:
                self.model.set_requires_gradient_sync(last)
            sync = (
                self._ddp.no_sync()
                if self._ddp is not None and not last
                else contextlib.nullcontext()
            )
            if self.monitor is not None:
                self.monitor.clear()
            with sync:
                with self._autocast():
                    logits = self.model(ids)  # (B, T, V), vocabulary-sharded under TP
                with loss_context(tp):
                    loss = _local(self._ce_sum(logits, labels)) / denom  # differentiable
                    total = loss * scale
                    if self.monitor is not None:
                        if self.aux_alpha > 0:
                            aux = self.monitor.aux_loss(mask, self.aux_alpha, self.seq_aux)
                            aux = aux / (n_seqs if self.seq_aux else len(batches) * lay.dp_degree)
                            total = total + aux * scale
                            aux_sum += aux.detach()
                        if self.bias_gamma > 0:
                            self.monitor.add_loads(mask)
                        self.monitor.clear()
                    total.backward()
            loss_sum += loss.detach()
        return {"loss": loss_sum, "aux_loss": aux_sum, "tokens": self._window_tokens}

    def _grad_norm(self) -> torch.Tensor:
        """The global L2 norm of all gradients (every shard counted once)."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        expert_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        experts = {id(p) for p in self._expert_params}
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor):
                sq += torch.linalg.vector_norm(g.float()).full_tensor() ** 2
            elif id(p) in experts:
                expert_sq += g.float().pow(2).sum()
            else:
                sq += g.float().pow(2).sum()
        if self.rt.ep_group is not None:
            dist.all_reduce(expert_sq, group=self.rt.ep_group)
        sq += expert_sq
        if self.layout.pp > 1:
            dist.all_reduce(sq, group=self.rt.pp_mesh.get_group())
        return sq.sqrt()

    def _sync_expert_grads(self) -> None:
        """Expert gradients (outside DDP/FSDP): sum over the ranks holding the same experts and
        undo the data-parallel loss scale."""
        if not self._expert_params:
            return
        outer = self.rt.ep_outer_group
        for p in self._expert_params:
            if p.grad is None:
                continue
            if dist.get_world_size(outer) > 1:
                dist.all_reduce(p.grad, group=outer)
            p.grad.div_(self.layout.dp_degree)

    def train_step(self) -> dict:
        """One optimizer step on every rank; the returned metrics are global (same on all).
        Under ``DEEPWHALE_COUNT_COMM=1`` the step's collectives are recorded (comm_counter)."""
        if self.comm is None:
            return self._train_step()
        self.comm.begin()
        t0 = time.perf_counter()
        self._memory = None
        out = self._train_step()
        seconds = time.perf_counter() - t0
        hook = None
        c = self.compression
        if c is not None:
            hook = {
                "payload": c.bytes_sent_step,
                "wire": c.wire_bytes_step,
                "dense_payload": c.dense_bytes_step,
                "dense_wire": c.dense_wire_bytes_step,
            }
        self.comm.end(self.step, seconds, hook, self._memory)
        return out

    def _train_step(self) -> dict:
        lr = self.schedule.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.compression is not None:
            self.compression.set_step(self.step)
        metrics = self.backward_window(self.next_batches())
        self._drop_unused_expert_grads()
        self._sync_expert_grads()
        clip = self.cfg.optim.grad_clip
        grad_norm = self._grad_norm()
        if clip > 0:
            coef = torch.clamp(clip / (grad_norm + 1e-6), max=1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        gc = self.layout.grad_compression
        if gc.gap_aware_adam:
            from deepwhale.parallel.compression import adamw_step_gap_aware

            adamw_step_gap_aware(self.optimizer, self.compression.sent_mask)
        else:
            self.optimizer.step()
        if self.comm is not None and not self.comm.data["memory"]:
            from deepwhale.parallel.comm_counter import state_bytes

            self._memory = state_bytes(self.params, self.optimizer)  # grads still held here
        self.optimizer.zero_grad(set_to_none=True)
        balance = self.monitor is not None and self.bias_gamma > 0
        imbalance = torch.ones((), device=self.device)
        if balance:
            self._sum_loads()
            imbalance = self.monitor.update_bias(self.bias_gamma)
        self.step += 1
        self.tokens_seen += metrics["tokens"]
        packed = torch.stack([metrics["loss"], metrics["aux_loss"]]).float()
        dist.all_reduce(packed, group=self.rt.dp_group)  # the window's loss = sum over dp ranks
        if self.layout.pp > 1:  # only the last stage computed it
            dist.all_reduce(packed, group=self.rt.pp_mesh.get_group())
        loss, aux = packed.tolist()
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": metrics["tokens"],
            "aux_loss": aux if self.aux_alpha > 0 else None,
            "expert_imbalance": float(imbalance) if balance else None,
        }

    def _sum_loads(self) -> None:
        """Sum the routers' per-expert loads over the data-parallel ranks (one all-reduce)."""
        loads = self.monitor.loads
        if not loads or self.layout.dp_degree == 1:
            return
        flat = torch.cat([x.to(self.device) for x in loads])
        dist.all_reduce(flat, group=self.rt.dp_group)
        for x, y in zip(loads, flat.split([len(x) for x in loads]), strict=True):
            x.copy_(y)

    def _val_share(self) -> tuple[list[int], int]:
        """This data-parallel rank's validation sequences: the first ``eval.max_batches x
        micro_batch_size x dp_degree`` (what one process with the global micro-batch evaluates),
        dealt round-robin; and how many every rank has at most."""
        dp, d = self.layout.dp_degree, self.rt.dp_rank
        n = min(self.cfg.eval.max_batches * self.cfg.train.micro_batch_size * dp, len(self.val_ds))
        return list(range(d, n, dp)), -(-n // dp)

    def _val_batches(self, rows: int):
        """This rank's validation batches of ``rows`` sequences, the same number on every rank
        (collectives need it); filler rows are masked from the loss."""
        mine, most = self._val_share()
        for start in range(0, most, rows):
            idx = mine[start : start + rows]
            real = len(idx)
            fill = idx[-1] if idx else 0
            b = self._pad(
                collate([self.val_ds[i] for i in idx + [fill] * (rows - real)], self.pad_id)
            )
            b["labels"][real:] = IGNORE_INDEX
            yield b

    @torch.no_grad()
    def _pipeline_evaluate(self) -> torch.Tensor:
        """Validation sums ``(loss, tokens)`` through ``schedule.eval``, in batches of the training
        window's shape (the pipeline's shapes are fixed)."""
        from deepwhale.parallel.pp import pipeline_step

        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.pp_loss.denom = 1.0
        last = any(m.is_last for m in self.stages)
        for b in self._val_batches(self._pp_rows):
            labels = b["labels"].to(self.device)
            with loss_context(self.layout.tp > 1):
                ce = pipeline_step(
                    self.pp_schedule,
                    self.stages,
                    b["input_ids"].to(self.device),
                    labels,
                    train=False,
                )
            if last:
                sums[0] += ce.double()
                sums[1] += int((labels != IGNORE_INDEX).sum())
        dist.all_reduce(sums, group=self.rt.pp_mesh.get_group())
        return sums

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss over the sequences one process with the global micro-batch would
        evaluate; data-parallel ranks split them and the sums are all-reduced, so every rank
        returns the one-process value."""
        if self.val_ds is None:
            return {}
        self.model.eval()
        if self.monitor is not None:
            self.monitor.enabled = False
        if self.layout.pp > 1:
            sums = self._pipeline_evaluate()
        else:
            sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, tokens
            for b in self._val_batches(self.cfg.train.micro_batch_size):
                labels = b["labels"].to(self.device)
                with self._autocast():
                    logits = self.model(b["input_ids"].to(self.device))
                with loss_context(self.layout.tp > 1):
                    ce = _local(self._ce_sum(logits, labels))
                sums[0] += ce.double()
                sums[1] += int((labels != IGNORE_INDEX).sum())
        dist.all_reduce(sums, group=self.rt.dp_group)
        self.model.train()
        if self.monitor is not None:
            self.monitor.enabled = True
        from deepwhale.train.metrics import perplexity

        mean = float(sums[0] / sums[1].clamp(min=1))
        return {"val_loss": mean, "val_ppl": perplexity(mean)}

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "sampler": self.sampler.state_dict(),
            "tokens_seen": self.tokens_seen,
            "schedule": self.schedule.state_dict(),
            "config": self.cfg.to_dict(),
            "layout": dataclasses.asdict(self.layout),
            "world_size": self.rt.world_size,
        }

    def save_checkpoint(self) -> Path:
        """A DCP checkpoint of this step, written by every rank (see
        :mod:`deepwhale.parallel.checkpoint`). Under ``checkpoint.async_save`` the write goes on
        in the background (the previous one is waited for first) and the returned folder
        appears once it is complete; otherwise it is complete on return."""
        self.wait_for_checkpoints()
        extra = self.compression.state_dict() if self.compression is not None else None
        args = (
            self.out / "checkpoints",
            self.step,
            self.model,
            self.optimizer,
            self._state(),
            self.cfg.checkpoint.keep_last,
        )
        if not self.cfg.checkpoint.async_save:
            return pckpt.save_dcp(*args, extra=extra)
        if self._ckpt_group is None:
            self._ckpt_group = dist.new_group(backend="gloo")
        self._pending = pckpt.async_save_dcp(*args, extra=extra, process_group=self._ckpt_group)
        return self._pending.folder

    def _after_step(self, first: bool) -> None:
        if self._pending is not None:
            self._pending.poll()  # rank 0 renames it into place as soon as it is written
        super()._after_step(first)

    def wait_for_checkpoints(self) -> None:
        """Wait for the background save on every rank (rank 0 then renames it into place), then
        a barrier, so every rank sees the checkpoint complete afterwards. ``_pending`` is kept
        after a successful :meth:`AsyncSave.poll` until here, so every rank (whatever its own
        write's timing) takes this barrier at the same point."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            dist.barrier()

    def load_checkpoint(self, folder: Path) -> None:
        """Restore from a DCP checkpoint saved under any layout (DCP reshards).

        Raises:
            CheckpointNotFound: missing, incomplete, a single-process checkpoint, or another
                model's.
        """
        folder = Path(folder)
        if ckpt.is_complete(folder) and not pckpt.is_dcp(folder):
            raise ckpt.CheckpointNotFound(
                f"{folder}: a single-process checkpoint; a parallel run resumes from the "
                "distributed (DCP) checkpoints that parallel runs write"
            )
        t0 = time.perf_counter()
        if self.layout.grad_compression.gap_aware_adam and pckpt.has_key_suffix(
            folder, ".last_sent"
        ):
            from deepwhale.parallel.compression import init_gap_aware_state

            init_gap_aware_state(self.optimizer)  # so DCP loads its gap counters too
        out = pckpt.load_dcp(
            folder, self.model, self.optimizer, want_extra=self.compression is not None
        )
        if self.compression is not None and out["extra"] is not None:
            self.compression.load_state_dict(out["extra"])
        state = out["state"]
        self._check_global_batch(folder, state)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.resumed_from = folder
        self.load_seconds = time.perf_counter() - t0

    def _check_global_batch(self, folder: Path, state: dict) -> None:
        """Warn (rank 0) when the sequences per optimizer step differ from the saved run's: the
        data order, and so the losses, then differ from an uninterrupted run. Restarting on
        fewer processes keeps them by scaling ``train.micro_batch_size`` (per data-parallel
        rank) by the inverse of the data-parallel degree."""
        try:
            saved = state["config"]["train"]
            lay = state["layout"]
            dp = (lay["dp"] or 1) * lay["dp_shard"]
            before = saved["micro_batch_size"] * saved["grad_accum"] * dp
        except (KeyError, TypeError):
            return
        t = self.cfg.train
        now = t.micro_batch_size * t.grad_accum * self.layout.dp_degree
        if before != now and self.rt.is_main:
            log.warning(
                "%s was saved with %d sequences per optimizer step, this run takes %d: the data "
                "order differs from the original run (keep train.micro_batch_size x "
                "train.grad_accum x data-parallel degree the same, e.g. double "
                "micro_batch_size on half the processes)",
                folder,
                before,
                now,
            )

    def save_final(self) -> Path:
        """Save a last DCP checkpoint, then rank 0 writes ``final/`` (an HF folder) from it."""
        from deepwhale.lora import copy_tokenizer_files

        self.wait_for_checkpoints()
        root = self.out / "checkpoints"
        folder = ckpt.step_dir(root, self.step)
        if not (ckpt.is_complete(folder) and pckpt.is_dcp(folder)):
            folder = self.save_checkpoint()
            self.wait_for_checkpoints()  # an async save: rank 0 exports it once complete
        final = self.out / "final"
        if self.rt.is_main:
            pckpt.export_hf(folder, self.config, final)
            src = self.tokenizer_folder
            if src is not None:
                copy_tokenizer_files(src, final)
        dist.barrier()
        return final


class _TokenLoss:
    """The pipeline's loss: ``sum of token CEs / denom`` for one microbatch (``denom`` set per
    window); a plain tensor even when the logits are vocabulary-sharded (TP)."""

    def __init__(self, tp: bool) -> None:
        self.tp = tp
        self.denom = 1.0

    def __call__(self, logits, labels):
        ce = token_cross_entropy_sum(logits, labels)
        return _local(ce) / self.denom


class _AttachLoss(torch.autograd.Function):
    """``forward(out, loss) = out``; ``backward`` passes the gradient through and gives ``loss``
    a gradient of 1, so a loss computed inside a pipeline stage joins the backward pass."""

    @staticmethod
    def forward(ctx, out, loss):
        ctx.save_for_backward(loss)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class _RankModule(torch.nn.Module):
    """This rank's pipeline stage(s) under the single-device attribute names (``model.
    embed_tokens``, ``model.layers.{i}``, ``model.norm``, ``lm_head``), so state dicts and
    checkpoints use the HF keys whatever the layout. It only holds modules; it has no forward."""

    def __init__(self, stages) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        layers = torch.nn.ModuleDict()
        for st in stages:
            for k, layer in st.model.layers.items():
                layers[k] = layer
            if st.is_first:
                self.model.embed_tokens = st.model.embed_tokens
            if st.is_last:
                self.model.norm = st.model.norm
                self.lm_head = st.lm_head
        self.model.layers = layers
