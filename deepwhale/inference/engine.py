"""The inference engine: one model, one static cache, a scheduler with continuous batching.

* The cache is allocated once for ``max_batch_size`` slots of ``max_seq_len`` tokens
  (:func:`deepwhale.model.cache.make_cache`); a request owns one slot from admission to finish.
* Each :meth:`Engine.step` admits waiting requests into free slots and prefills them (in chunks of
  ``prefill_chunk`` tokens, so peak activation memory is bounded by the chunk, not the prompt),
  then runs one batched decode step over every running request. Requests join and leave between
  steps without stalling the others (continuous batching, Orca: Yu et al., OSDI'22).
* Sampling follows the OpenAI semantics (:mod:`deepwhale.inference.sampling`): ``n`` samples
  fork the prompt's cache rows instead of re-running the prefill; per-token logprobs with top-k
  alternatives; stop strings are held back until they cannot match; ``finish_reason`` is
  ``stop`` or ``length``.
* Requests stream :class:`~deepwhale.inference.generate.GenerationChunk` deltas through the
  tokenizer's incremental detokenizer and can be cancelled at any time, which frees their slot.

The engine can run synchronously (:meth:`Engine.generate`, :meth:`Engine.step`) or in a background
thread (:meth:`Engine.start`), where each request is an iterator of chunks (the server's mode).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from deepwhale.inference.generate import (  # noqa: F401  (TokenLogprob re-exported)
    GenerationChunk,
    PromptTooLongError,
    TextStream,
    TokenLogprob,
)
from deepwhale.inference.guided import (
    GuidedDecodingError,
    GuidedMatcher,
    llg_tokenizer,
    mask_logits,
)
from deepwhale.inference.sampling import (
    NonFiniteLogitsError,
    SamplingParams,
    apply_penalties,
    sample,
)
from deepwhale.model.cache import make_cache
from deepwhale.model.transformer import CausalLM

_DONE = object()


@dataclass
class Sequence:
    """One sample of a request, bound to one cache slot while it runs."""

    index: int
    params: SamplingParams
    generator: torch.Generator | None
    stream: TextStream
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    next_logits: torch.Tensor | None = None  # (V,) logits for the next token to sample
    guide: GuidedMatcher | None = None  # grammar state when ``params.guided`` is set


class SamplingError(ValueError):
    """Sampling produced no valid distribution for one request (e.g. extreme penalties)."""


class Request:
    """A submitted prompt with ``n`` samples. Iterate it to stream ``(index, chunk)`` pairs.

    Attributes:
        request_id: unique id.
        prompt_ids: the prompt, tokens.
        params: sampling settings shared by the samples (sample ``i`` uses ``seed + i``).
        n: number of independent samples.
        logprobs: None, or how many top alternatives to report per token (0-20).
        sequences: the samples' state (output ids, text, finish reason).
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer,
        n: int = 1,
        logprobs: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.n = n
        self.logprobs = logprobs
        self.cancelled = False
        self.sequences = []
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
            detok = tokenizer.detokenizer(prompt_ids=self.prompt_ids, skip_special_tokens=True)
            self.sequences.append(Sequence(i, params, gen, TextStream(detok, params.stop)))
        self._queue: queue.Queue = queue.Queue()
        self._sink = None
        self._sink_lock = threading.Lock()
        self.prompt_tensor = torch.tensor(self.prompt_ids, device=device)
        #: the exception that failed this request (its samples stop), or None
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        """True once every sample has a finish reason."""
        return all(s.finish_reason is not None for s in self.sequences)

    @property
    def num_generated(self) -> int:
        """Generated tokens over all samples."""
        return sum(len(s.output_ids) for s in self.sequences)

    def texts(self) -> list[str]:
        """The final text of each sample (stop strings excluded).

        Raises:
            Exception: the error that failed this request, if any.
        """
        if self.error is not None:
            raise self.error
        return [s.stream.final_text for s in self.sequences]

    def on_output(self, sink) -> None:
        """Deliver this request's output to ``sink`` instead of the blocking iterator.

        ``sink(item)`` is called on the engine thread with each ``(sample_index, chunk)``, with
        the exception that failed the request, and finally with ``None`` when every sample has
        finished. Items produced before the call are delivered first, in order. ``sink`` must
        be quick and must not raise (hand items to your own loop, e.g.
        ``loop.call_soon_threadsafe``); it replaces a thread blocked in ``__iter__`` per request.
        """
        with self._sink_lock:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                sink(None if item is _DONE else item)
            self._sink = sink

    def _put(self, item) -> None:
        with self._sink_lock:
            if self._sink is None:
                self._queue.put(item)
            else:
                self._sink(None if item is _DONE else item)

    def __iter__(self) -> Iterator[tuple[int, GenerationChunk]]:
        """Blocking stream of ``(sample_index, chunk)`` until every sample finished."""
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Engine:
    """Continuous-batching generation over one :class:`CausalLM`.

    Args:
        model: the model (eval mode; its device and dtype are used for the cache).
        tokenizer: a :class:`deepwhale.tokenizer.Tokenizer`.
        max_batch_size: concurrent sequences (cache slots); ``DeepSeekModel.set_batch_size``.
        max_seq_len: tokens per slot (default: ``max_position_embeddings``, capped at 4096).
        prefill_chunk: prompt tokens per prefill forward pass.

    Raises:
        ValueError: a non-positive size.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or min(model.config.max_position_embeddings, 4096)
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.caches = make_cache(
            model.config, max_batch_size, self.max_seq_len, dtype=self.dtype, device=self.device
        )
        self.waiting: deque[Request] = deque()
        self.running: list[tuple[Request, Sequence]] = []
        self.free_slots = list(range(max_batch_size))
        self.lengths = [0] * max_batch_size  # tokens written per slot
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.decode_fn = self._decode_forward
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0}

    # ------------------------------------------------------------------ submission
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        n: int = 1,
        logprobs: int | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a prompt; returns the :class:`Request` to iterate or inspect.

        Raises:
            PromptTooLongError: empty prompt, or it leaves no room in a ``max_seq_len`` slot.
            ValueError: ``n`` outside ``1..max_batch_size`` or ``logprobs`` outside 0..20.
            GuidedDecodingError: ``params.guided`` has an invalid schema, regex or grammar.
        """
        params = params or SamplingParams()
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty (no tokens)")
        if len(prompt_ids) >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt is {len(prompt_ids)} tokens, but the engine's context is "
                f"{self.max_seq_len} tokens; shorten the prompt"
            )
        if not isinstance(n, int) or not 1 <= n <= self.max_batch_size:
            raise ValueError(f"n must be in 1..{self.max_batch_size} (the batch size), got {n}")
        if params.seed is not None and params.seed + n - 1 >= 2**64:
            raise ValueError(
                f"seed must be below 2**64 - {n - 1} with n={n} (sample i uses seed + i)"
            )
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ValueError(f"logprobs must be in 0..20, got {logprobs}")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        rid = request_id or f"req-{next(self._ids)}"
        req = Request(rid, prompt_ids, params, self.tokenizer, n, logprobs, self.device)
        if params.guided is not None:  # one grammar state per sample
            llg = llg_tokenizer(self.tokenizer, self.model.config.vocab_size)
            first = GuidedMatcher(params.guided, llg)
            for seq in req.sequences:
                seq.guide = first if seq.index == 0 else first.copy()
        with self._lock:
            self.waiting.append(req)
            self._lock.notify()
        return req

    def cancel(self, request: Request) -> None:
        """Stop ``request``; its slots are freed before the next step. Safe from any thread."""
        request.cancelled = True
        with self._lock:
            self._lock.notify()

    # ------------------------------------------------------------------ scheduling
    def has_work(self) -> bool:
        """True while requests wait or run."""
        return bool(self.waiting or self.running)

    def step(self) -> list[tuple[Request, int, GenerationChunk]]:
        """Admit and prefill what fits, then decode one token for every running sequence.

        Returns the chunks produced in this step as ``(request, sample_index, chunk)``; they are
        also put on each request's stream.
        """
        events: list[tuple[Request, int, GenerationChunk]] = []
        self._reap_cancelled(events)
        self._admit(events)
        if self.running:
            self._decode(events)
        self.stats["steps"] += 1
        return events

    def _reap_cancelled(self, events) -> None:
        with self._lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                for seq in req.sequences:
                    self._finish(req, seq, "cancelled", events)
        for req, seq in [(r, s) for r, s in self.running if r.cancelled]:
            self._finish(req, seq, "cancelled", events)

    def _admit(self, events) -> None:
        while True:
            with self._lock:
                if not self.waiting or len(self.free_slots) < self.waiting[0].n:
                    return
                req = self.waiting.popleft()
                self.free_slots.sort()
                slots = [self.free_slots.pop(0) for _ in range(req.n)]
            try:
                logits = self._prefill(req.prompt_tensor, slots[0])
            except Exception as e:  # keep the engine alive; fail this request only
                with self._lock:
                    self.free_slots.extend(slots)
                self._fail_request(req, e)
                continue
            for slot in slots[1:]:
                for c in self.caches:
                    c.copy_row(slots[0], slot, len(req.prompt_ids))
            self.stats["prompt_tokens"] += len(req.prompt_ids)
            for seq, slot in zip(req.sequences, slots, strict=True):
                seq.slot = slot
                seq.next_logits = logits
                self.lengths[slot] = len(req.prompt_ids)
                self.running.append((req, seq))

    @torch.inference_mode()
    def _prefill(self, prompt: torch.Tensor, slot: int) -> torch.Tensor:
        """Chunked prefill of one prompt ``(P,)`` into ``slot``; returns last logits ``(V,)``."""
        caches = [c.rows(slot, slot + 1) for c in self.caches]  # this slot's row, as views
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = prompt[start : start + self.prefill_chunk][None]  # (1, C)
            pos = torch.arange(start, start + chunk.shape[1], device=self.device)[None]
            logits = self.model(chunk, positions=pos, caches=caches, last_only=True)
        return logits[0, -1].float()

    def _decode_forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step over cache rows ``0..B-1``: ``(B, 1)`` tokens -> ``(B, V)`` logits.

        Called under ``torch.no_grad`` (not inference mode, which torch.compile cannot trace
        through the in-place cache writes)."""
        return self.model(tokens, positions=positions, caches=self.caches)[:, -1].float()

    def _decode(self, events) -> None:
        # 1. sample the next token of every running sequence from its pending logits; plain
        #    greedy rows (no penalties, no logprobs) share one batched argmax
        self._mask_guided()
        running = list(self.running)
        plain = [
            i
            for i, (req, seq) in enumerate(running)
            if seq.params.greedy
            and req.logprobs is None
            and seq.params.repetition_penalty == 1
            and not seq.params.presence_penalty
            and not seq.params.frequency_penalty
        ]
        tokens_for = {}
        if plain:
            stacked = torch.stack([running[i][1].next_logits for i in plain])  # (G, V)
            if bool(torch.isnan(stacked).any()):
                raise NonFiniteLogitsError("the model produced NaN logits; check the weights")
            tokens_for = dict(zip(plain, stacked.argmax(dim=-1).tolist(), strict=True))
        for i, (req, seq) in enumerate(running):
            if req.error is not None:  # a sibling sample already failed this request
                continue
            try:
                token = tokens_for[i] if i in tokens_for else self._sample(req, seq)
            except (RuntimeError, ValueError, ArithmeticError) as e:  # this request only
                self._fail_request(req, SamplingError(f"sampling failed: {e}"))
                continue
            self._append(req, seq, token, events)
        if not self.running:
            return
        # 2. one forward over rows 0..max_slot for the sequences still running
        width = max(seq.slot for _, seq in self.running) + 1
        tokens = torch.zeros(width, 1, dtype=torch.long, device=self.device)
        positions = torch.zeros(width, 1, dtype=torch.long, device=self.device)
        for _, seq in self.running:
            tokens[seq.slot, 0] = seq.output_ids[-1]
            positions[seq.slot, 0] = self.lengths[seq.slot]
        with torch.no_grad():
            logits = self.decode_fn(tokens, positions)  # (width, V)
        for _, seq in self.running:
            self.lengths[seq.slot] += 1
            seq.next_logits = logits[seq.slot]

    def _mask_guided(self) -> None:
        """Structured output: ``-inf`` on the tokens each guided sequence's grammar forbids
        (unguided sequences are untouched and cost nothing)."""
        guided = [(r, s) for r, s in self.running if s.guide is not None and r.error is None]
        if not guided:
            return
        rows = mask_logits([s.guide for _, s in guided], [s.next_logits for _, s in guided])
        for (req, seq), row in zip(guided, rows, strict=True):
            if isinstance(row, GuidedDecodingError):
                self._fail_request(req, row)
            else:
                seq.next_logits = row

    def _sample(self, req: Request, seq: Sequence) -> int:
        p = seq.params
        logits = seq.next_logits
        if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device)
            logits = apply_penalties(logits, req.prompt_tensor, out, p)
        token = int(sample(logits[None], p, seq.generator)[0])
        if req.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            top = []
            if req.logprobs:
                vals, idx = lp.topk(req.logprobs)
                top = list(zip(idx.tolist(), vals.tolist(), strict=True))
            seq.logprobs.append(TokenLogprob(token, float(lp[token]), top))
        return token

    def _append(self, req: Request, seq: Sequence, token: int, events) -> None:
        p = seq.params
        eos = () if p.ignore_eos else self.tokenizer.eos_token_ids
        if token in eos:
            self._finish(req, seq, "stop", events, token, seq.stream.eos())
            return
        done = False
        if seq.guide is not None:
            try:
                done = seq.guide.consume(token)  # True: the grammar allows nothing more
            except GuidedDecodingError as e:
                self._fail_request(req, e)
                return
        seq.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        room = self.lengths[seq.slot] + 1 < self.max_seq_len
        text, finish = seq.stream.add(
            token, last=done or len(seq.output_ids) >= p.max_new_tokens or not room
        )
        if done and finish is not None:
            finish = "stop"
        if finish is not None:
            self._finish(req, seq, finish, events, token, text)
            return
        self._emit(req, seq, GenerationChunk(text, token), events)

    def _fail_request(self, req: Request, error: BaseException) -> None:
        """Stop every sample of ``req`` with ``error``: free its slots, wake its stream."""
        req.error = error
        for seq in req.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "error"
            if seq.slot is not None:
                self.running.remove((req, seq))
                with self._lock:
                    self.free_slots.append(seq.slot)
                seq.slot = None
        with self._lock:
            if req in self.waiting:
                self.waiting.remove(req)
        req._put(error)
        req._put(_DONE)

    def _emit(self, req: Request, seq: Sequence, chunk: GenerationChunk, events) -> None:
        if req.logprobs is not None and chunk.token_id is not None and seq.logprobs:
            chunk.logprobs = seq.logprobs[-1]
        events.append((req, seq.index, chunk))
        req._put((seq.index, chunk))

    def _finish(
        self, req, seq, reason: str, events, token: int | None = None, text: str | None = None
    ) -> None:
        """End ``seq`` with ``reason``, emitting ``text`` (default: whatever is not out yet)."""
        chunk = GenerationChunk(seq.stream.rest() if text is None else text, token, reason)
        seq.finish_reason = reason
        if seq.slot is not None:
            self.running.remove((req, seq))
            with self._lock:
                self.free_slots.append(seq.slot)
            seq.slot = None
        self._emit(req, seq, chunk, events)
        if req.finished:
            req._put(_DONE)

    def compile_decode(
        self, mode: str | None = None, backend: str = "inductor", options=None
    ) -> None:
        """``torch.compile`` the decode step; caches switch to static lengths (no graph breaks
        from data-dependent slicing)."""
        for c in self.caches:
            c.static_len = True
        kwargs = {"backend": backend, "dynamic": True}
        if options:
            kwargs["options"] = options
        elif mode:
            kwargs["mode"] = mode
        self.decode_fn = torch.compile(self._decode_forward, **kwargs)

    # ------------------------------------------------------------------ drivers
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[Request]:
        """Run ``prompts`` (token id lists) to completion synchronously; returns the requests.

        More prompts than ``max_batch_size`` queue and join as slots free up.
        """
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        if self._thread is not None:  # the background loop drives them: wait for each
            for req in reqs:
                for _ in req:
                    pass
            return reqs
        try:
            while self.has_work():
                self.step()
        except BaseException as e:  # leave the engine usable: nothing stays running
            self._fail_all(e)
            for req in list(self.waiting):
                self._fail_request(req, e)
            raise
        return reqs

    def start(self) -> None:
        """Run the scheduler loop in a daemon thread until :meth:`shutdown`."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="deepwhale-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.has_work():
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # a model-wide failure must not hang the clients
                self._fail_all(e)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every running request with ``error`` (e.g. NaN logits from the model)."""
        for req in {id(r): r for r, _ in self.running}.values():
            self._fail_request(req, error)

    def shutdown(self) -> None:
        """Stop the background thread (running requests are left as they are)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
