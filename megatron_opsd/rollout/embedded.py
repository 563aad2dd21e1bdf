"""An in-process rollout engine on a transformers causal LM (single machine: CPU runs, tests, the demo).

Generation is a compact sampling loop over the model's forward with a KV cache rather than
``model.generate``: the loop owns the random streams (so a seeded run is reproducible and does not
depend on how sequences are batched) and reports exactly the log-probs defined below.

- Prompts are left-padded into batches of up to ``max_batch_size`` sequences (``n`` per prompt);
  position ids count real tokens only, so a padded prompt sees the positions it would alone.
- Each sequence samples from its own ``torch.Generator``, seeded from ``(seed, sequence index)``
  (sequence index = prompt index * n + sample index), with the exponential-race form of
  categorical sampling: ``argmax(probs / Exp(1) noise)``.
- Processing order: temperature, then top-k (``top_k == -1``: off), then top-p; ``temperature == 0``
  is greedy (argmax of the raw logits, the first index on exact ties).
- With top-k, the top-p nucleus is cut from the k survivors (``torch.topk`` returns them sorted)
  instead of sorting the whole vocabulary, and the race runs over them alone, one Exp(1) draw per
  survivor: the same distribution over the vocabulary (tested) at k draws per token instead of V.
  A row with ties at its k-th value (truncation keeps them all) races over the whole vocabulary;
  which path a row takes depends on its own logits only, so its random stream, and its rollout,
  do not depend on the batch around it.
- A response ends with the first stop token (kept in the response, finish reason ``"stop"``) or
  after ``max_new_tokens`` (``"length"``). Prompt plus ``max_new_tokens`` must fit the model's
  ``max_position_embeddings``: that is an error, never a silent clip.

Log-probs: each sampled token's log-prob under the temperature-scaled full-vocabulary distribution,
``log_softmax(logits / temperature)``, taken BEFORE top-k / top-p truncation (for greedy, the
temperature is 1). That is what the trainer recomputes from its own logits, so the
rollout-vs-trainer mismatch measures numerics and weight sync, not truncation; it is also SGLang's
default (without ``SGLANG_RETURN_ORIGINAL_LOGPROB``) and what slime-style trainers compare against.
"""
from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel

from megatron_opsd.models.architectures import SUPPORTED_ARCHITECTURES
from megatron_opsd.rollout.engine import EngineHealth, Rollout, SamplingParams, sequence_seed
from megatron_opsd.section import Section


class EmbeddedEngineConfig(Section):
    kind: Literal["embedded"] = Field(default="embedded", description="a transformers model in the trainer's process")
    max_batch_size: int = Field(default=64, ge=1, description="sequences (prompts x n) per forward batch")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="parameter dtype of a model the engine builds or loads")


class WeightSyncError(RuntimeError):
    """A weight stream that does not fit the model; the engine refuses to generate until a good one arrives."""


class EmbeddedEngine:
    """:class:`~megatron_opsd.rollout.engine.RolloutEngine` on a transformers model, in this process."""

    def __init__(self, model: PreTrainedModel, cfg: EmbeddedEngineConfig | None = None):
        self.model = model.eval()
        self.cfg = cfg or EmbeddedEngineConfig()
        self.weight_version = 0
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.context_length = model.config.max_position_embeddings
        self._broken: str | None = None
        # transformers 5.x renamed the forward's past_key_values to cache (the old name warns, then goes).
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._plain_head = type(model).__name__ in SUPPORTED_ARCHITECTURES  # logits = lm_head(final hidden)

    @classmethod
    def from_hf_config(cls, hf_config: PretrainedConfig, cfg: EmbeddedEngineConfig | None = None,
                       device: torch.device | None = None) -> EmbeddedEngine:
        """A randomly initialized model of ``hf_config`` on ``device`` (default: the CPU); weights
        come later via ``update_weights``."""
        cfg = cfg or EmbeddedEngineConfig()
        return cls(AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, cfg.dtype)).to(device), cfg)

    @classmethod
    def from_pretrained(cls, path: str | Path, cfg: EmbeddedEngineConfig | None = None,
                        device: torch.device | None = None) -> EmbeddedEngine:
        """A local HF checkpoint directory (nothing is downloaded), on ``device`` (default: the CPU)."""
        cfg = cfg or EmbeddedEngineConfig()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), local_files_only=True)
        return cls(model.to(device), cfg)

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Rollout]]:
        """``params.n`` rollouts per prompt, in prompt order (see the module docstring for the rules)."""
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        sequences = [list(p) for p in prompts for _ in range(params.n)]
        rollouts = self.generate_sequences(sequences, params, [sequence_seed(seed, s) for s in range(len(sequences))])
        return [rollouts[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def generate_sequences(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int],
                           interrupt: threading.Event | None = None) -> list[Rollout]:
        """One rollout per prompt, prompt ``i`` sampled from a generator seeded with ``seeds[i]``
        (``params.n`` and ``params.seed`` are not used): what a server does with per-request seeds.
        Once ``interrupt`` is set, unfinished rollouts end after their current token with finish
        reason ``"abort"`` (a server's abort)."""
        self._check_usable()
        for i, prompt in enumerate(prompts):
            self._check_ids(prompt, f"prompt {i}")
            if len(prompt) + params.max_new_tokens > self.context_length:
                raise ValueError(
                    f"prompt {i}: {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceed the model's "
                    f"max_position_embeddings={self.context_length}")
        rollouts: list[Rollout] = []
        step = self.cfg.max_batch_size
        for start in range(0, len(prompts), step):
            generators = [torch.Generator(self.device).manual_seed(s) for s in seeds[start:start + step]]
            rollouts += self._generate_batch([list(p) for p in prompts[start:start + step]], generators, params,
                                             interrupt)
        return rollouts

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], generators: list[torch.Generator],
                        params: SamplingParams, interrupt: threading.Event | None = None) -> list[Rollout]:
        batch, width, steps = len(prompts), max(map(len, prompts)), params.max_new_tokens
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = {self._cache_kwarg: DynamicCache(config=self.model.config)}
        logits = self._next_logits(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
        tokens = torch.empty(batch, steps, dtype=torch.long, device=self.device)
        logprobs = torch.empty(batch, steps, dtype=torch.float32, device=self.device)
        lengths = torch.full((batch,), steps, device=self.device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        next_position = positions[:, -1:] + 1
        aborted = False
        for t in range(steps):
            tokens[:, t], logprobs[:, t] = sample(logits.float(), params, generators)
            hit = torch.isin(tokens[:, t], stop_ids) & ~stopped
            lengths[hit] = t + 1
            stopped |= hit
            if interrupt is not None and interrupt.is_set() and not bool(stopped.all()):
                lengths[~stopped] = t + 1
                aborted = True
                break
            if t == steps - 1 or bool(stopped.all()):
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            logits = self._next_logits(input_ids=tokens[:, t:t + 1], attention_mask=mask, position_ids=next_position,
                                       use_cache=True, **cache)
            next_position = next_position + 1
        tokens, logprobs, lengths = tokens.tolist(), logprobs.tolist(), lengths.tolist()
        unfinished = "abort" if aborted else "length"
        return [Rollout(tuple(tokens[r][:lengths[r]]), tuple(logprobs[r][:lengths[r]]),
                        "stop" if stopped[r] else unfinished, self.weight_version) for r in range(batch)]

    def _next_logits(self, **inputs: Any) -> torch.Tensor:
        """The next-token logits ``[B, V]`` after ``inputs``: the model's backbone, then the output
        layer as ``(W h^T)^T``. On CPU, MKL packs the right-hand operand of ``h W^T`` on every call,
        a copy of the whole output layer per decode step; as the left-hand one it is read in place.
        (A model outside the supported architectures computes its own logits.)"""
        if not self._plain_head:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1]
        return self._head(self.model.get_decoder()(**inputs).last_hidden_state[:, -1])

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on final hidden states ``[..., H]`` -> ``[..., V]``, as ``(W h^T)^T``
        (made contiguous: the sampler's reductions over the vocabulary are slow on a transposed view)."""
        head = self.model.get_output_embeddings()
        logits = (head.weight @ hidden.reshape(-1, hidden.shape[-1]).T).T.contiguous().reshape(*hidden.shape[:-1], -1)
        return logits if head.bias is None else logits + head.bias

    @torch.no_grad()
    def logprobs(self, sequences: Sequence[Sequence[int]], temperature: float = 1.0) -> list[torch.Tensor]:
        """Teacher-forced log-probs (fp32, CPU) of tokens ``1..len-1`` of each sequence under
        ``log_softmax(logits / temperature)``: the quantity the sampler reports, for probe checks."""
        self._check_usable()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for i, seq in enumerate(sequences):
            self._check_ids(seq, f"sequence {i}")
            if len(seq) < 2:
                raise ValueError(f"sequence {i} has {len(seq)} token(s); a log-prob needs at least 2")
        out: list[torch.Tensor] = []
        for start in range(0, len(sequences), self.cfg.max_batch_size):
            chunk = [list(s) for s in sequences[start:start + self.cfg.max_batch_size]]
            width = max(map(len, chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(chunk):  # right padding: causal attention never sees it
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            targets = ids[:, 1:].flatten()
            if self._plain_head:  # the output layer on 16 positions at a time: no [B, T, V] logits
                hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
                picked = torch.cat([_target_logprobs(self._head(h), t, temperature)
                                    for h, t in zip(hidden.flatten(0, 1).split(16), targets.split(16), strict=True)])
            else:
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                picked = _target_logprobs(logits.flatten(0, 1), targets, temperature)
            picked = picked.view(len(chunk), -1).cpu()
            out += [picked[row, :len(seq) - 1] for row, seq in enumerate(chunk)]
        return out

    # -- weights and health ----------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int, *, partial: bool = False,
                       adopt: bool = False) -> None:
        """Copy HF-named tensors into the model one at a time; every parameter must arrive exactly once.

        The whole stream is read before judging it, so that one error lists every problem: any
        unknown name, wrong shape, duplicate or missing parameter raises :class:`WeightSyncError`
        listing them all, and leaves the engine unusable (partly updated) until a later update
        succeeds; so does a stream that fails midway. Dtypes are cast. ``partial``: one bucket of
        an update streamed in several (a server's ``update_weights_from_distributed``): parameters
        may be missing, and success neither makes a broken engine usable nor changes its version.
        ``adopt``: a tensor of the parameter's dtype and device becomes the parameter's storage instead
        of being copied; a view of another model's weights is then read as that model changes them.
        """
        params = dict(self.model.named_parameters())
        received: set[str] = set()
        errors: list[str] = []
        try:
            for name, tensor in tensors:
                error = f"{name}: not a tensor ({type(tensor).__name__})" if not isinstance(tensor, torch.Tensor) \
                    else self._weight_error(params, name, tensor.shape, received)
                if error:
                    errors.append(error)
                    continue
                param = params[name]
                if adopt and (tensor.dtype, tensor.device) == (param.dtype, param.device):
                    param.data = tensor.detach()
                else:
                    param.copy_(tensor)
                received.add(name)
        except BaseException:
            self._broken = f"weight update to version {version} failed midway"
            raise
        errors += self._missing(params, received, partial)
        if errors:
            self._broken = f"weight update to version {version} failed"
            raise WeightSyncError(f"{self._broken}:\n  " + "\n  ".join(errors))
        if not partial:
            self._broken = None
            self.weight_version = version

    def weight_errors(self, shapes: Iterable[tuple[str, Sequence[int]]]) -> list[str]:
        """What :meth:`update_weights` would refuse in a complete stream of tensors of these names
        and shapes, known before any is read (e.g. from safetensors headers)."""
        params = dict(self.model.named_parameters())
        received: set[str] = set()
        errors = []
        for name, shape in shapes:
            if error := self._weight_error(params, name, shape, received):
                errors.append(error)
            else:
                received.add(name)
        return errors + self._missing(params, received, partial=False)

    def _weight_error(self, params: dict[str, torch.nn.Parameter], name: str, shape: Sequence[int],
                      received: set[str]) -> str | None:
        param = params.get(name)
        if param is None:
            tied_or_buffer = name in set(self.model.state_dict()) - set(params)
            return f"{name}: {'not a parameter of this model (tied or a buffer)' if tied_or_buffer else 'unknown name'}"
        if name in received:
            return f"{name}: sent twice"
        if tuple(shape) != tuple(param.shape):
            return f"{name}: shape {list(shape)}, the model expects {list(param.shape)}"
        return None

    @staticmethod
    def _missing(params: dict[str, torch.nn.Parameter], received: set[str], partial: bool) -> list[str]:
        missing = [name for name in params if name not in received]
        return [f"{len(missing)} parameter(s) not received: {', '.join(missing)}"] if missing and not partial else []

    def health(self) -> EngineHealth:
        if self._broken:
            return EngineHealth(ok=False, detail=self._broken)
        params = sum(p.numel() for p in self.model.parameters())
        dtype = next(self.model.parameters()).dtype
        return EngineHealth(ok=True, detail=f"{type(self.model).__name__}, {params} parameters, {dtype} on {self.device}")

    def close(self) -> None:
        """Nothing to release: the model lives and dies with this process."""

    def _check_usable(self) -> None:
        if self._broken:
            raise WeightSyncError(f"{self._broken}; send a complete weight stream before generating")

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        if not ids:
            raise ValueError(f"{what} is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")


def sample(logits: torch.Tensor, params: SamplingParams,
           generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, log-prob) per row of ``logits`` [B, V] (fp32); row ``r`` draws from ``generators[r]``
    (the top-k shortcut: module docstring)."""
    if params.temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, -1)
    token = torch.empty(scaled.shape[0], dtype=torch.long, device=scaled.device)
    whole = torch.ones(scaled.shape[0], dtype=torch.bool, device=scaled.device)  # rows racing the whole vocabulary
    if 0 < params.top_k < scaled.shape[-1]:
        values, index = torch.topk(scaled, params.top_k, dim=-1)
        whole = (scaled >= values[:, -1:]).sum(-1) > params.top_k  # ties at the k-th value
        rows = (~whole).nonzero()[:, 0]
        if len(rows):
            values, index = values[rows], index[rows]
            if params.top_p < 1:
                values = values.masked_fill(_outside_nucleus(values, params.top_p), float("-inf"))
            race = values.softmax(-1) / _exponential(values, [generators[r] for r in rows.tolist()])
            token[rows] = index.gather(-1, race.argmax(-1, keepdim=True))[:, 0]
    rows = whole.nonzero()[:, 0]
    if len(rows):
        probs = torch.softmax(truncate(scaled[rows], params.top_k, params.top_p), -1)
        token[rows] = (probs / _exponential(probs, [generators[r] for r in rows.tolist()])).argmax(-1)
    return token, logprobs.gather(-1, token[:, None])[:, 0]


def _exponential(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Exp(1) noise shaped like ``like``, row ``r`` drawn from ``generators[r]`` (never 0)."""
    noise = torch.empty_like(like)
    for row, generator in zip(noise, generators, strict=True):
        row.exponential_(generator=generator)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _outside_nucleus(ordered: torch.Tensor, top_p: float) -> torch.Tensor:
    """Of logits sorted descending: those after the smallest prefix whose probability reaches ``top_p``."""
    probs = ordered.softmax(-1)
    return probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p


def truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top-k (ties at the k-th value kept) and the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (at least one token).
    """
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1:
        ordered, order = scaled.sort(dim=-1, descending=True)
        scaled = scaled.scatter(-1, order, ordered.masked_fill(_outside_nucleus(ordered, top_p), float("-inf")))
    return scaled


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, rows: int = 16) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` at ``targets`` per row of ``logits`` [N, V] (fp32, [N]),
    ``rows`` rows at a time: never a second logits-sized tensor (64 positions over a 150k
    vocabulary are 39 MB per copy)."""
    return torch.cat([torch.log_softmax(block.float() / temperature, -1).gather(-1, picked[:, None])[:, 0]
                      for block, picked in zip(logits.split(rows), targets.split(rows), strict=True)]) \
        if len(logits) else logits.new_zeros(0, dtype=torch.float32)
