"""The rollout engine's weights kept the trainer's: when a push is due, and the push itself."""
from __future__ import annotations

from megatron_opsd.rollout.sync.base import WeightSync


class EngineWeights:
    """Pushes the trainer's weights through ``sync`` (None: the engine's rollouts do not depend on
    them) every ``interval`` steps and before each evaluation, which samples from the engine. The
    loop also pushes before the first step (a resumed run re-syncs), so the probe check runs before
    anything is trained."""

    def __init__(self, sync: WeightSync | None, interval: int):
        self.sync, self.interval = sync, interval

    def due(self, step: int, evaluating: bool) -> bool:
        return self.sync is not None and (step % self.interval == 0 or evaluating)

    def push(self, version: int) -> dict[str, float]:
        """Collective over every trainer rank; the sync's metrics."""
        return self.sync.push(version) if self.sync is not None else {}

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
