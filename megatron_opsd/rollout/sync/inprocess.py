"""``rollout.sync.kind: inprocess``: the whole model gathered on global rank 0 and copied tensor by
tensor into the embedded engine living in that process."""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from megatron.core.utils import unwrap_model

from megatron_opsd.models.bridge import drain, model_hf_tensors
from megatron_opsd.parallel import broadcast_from_rank0
from megatron_opsd.rollout.embedded import EmbeddedEngine
from megatron_opsd.rollout.sync.base import ProbeCheck


class InProcessSync:
    """Streams the whole model into an :class:`EmbeddedEngine` in global rank 0's process
    (``engine`` is None on every other rank).

    ``share``: the engine adopts the streamed tensors rather than copying them. On a rank holding
    whole weights (TP 1, the first pipeline stage) most are the trainer's parameters themselves
    (all but the fused QKV, which is split), so the engine needs no copy of them and reads every
    optimizer step as it happens: right only when each step's rollouts are generated after the
    previous step's push and nothing samples while the trainer works (sync interval 1, no rollouts
    ahead), and the teacher's weights, exchanged into the parameters for the teacher pass, are never
    sampled from.
    """

    def __init__(self, engine: EmbeddedEngine | None, chunks: Sequence[torch.nn.Module], probe: ProbeCheck,
                 share: bool = False):
        self.engine, self.chunks, self.probe, self.share = engine, [unwrap_model(c) for c in chunks], probe, share

    def push(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        stream = model_hf_tensors(self.chunks)

        def load() -> None:
            try:
                self.engine.update_weights(stream, version, adopt=self.share)
            finally:
                drain(stream)  # also after a refusal: the other ranks are in the exporter's collectives

        if self.engine is None:
            drain(stream)
        broadcast_from_rank0(load)
        seconds = time.perf_counter() - start
        return {"time/weight_sync": seconds, "probe/logprob_abs_diff_max": self.probe(self.engine, version)}

    def close(self) -> None:
        """Nothing of it runs in the background."""
