"""A rollout engine that fails on cue, for the tests of interrupted runs."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from megatron_opsd.train.components import Components, build_components
from megatron_opsd.train.config import TrainConfig


class FailsAtCall:
    """``engine`` as it is, except that its ``at``-th ``generate`` call runs ``fail`` first (which
    raises, or kills the process)."""

    def __init__(self, engine, at: int, fail: Callable[[], None]):
        self.engine, self.at, self.fail, self.calls = engine, at, fail, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls == self.at:
            self.fail()
        return self.engine.generate(prompts, params)


def raising(error: BaseException) -> Callable[[], None]:
    def fail() -> None:
        raise error
    return fail


def failing_engine(at: int, fail: Callable[[], None]) -> Callable[[TrainConfig], Components]:
    """A ``build`` for ``train``: the run's components with rank 0's engine failing at call ``at``."""
    def build(cfg: TrainConfig) -> Components:
        c = build_components(cfg)
        return replace(c, engine=None if c.engine is None else FailsAtCall(c.engine, at, fail))
    return build
