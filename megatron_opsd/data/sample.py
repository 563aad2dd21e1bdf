"""The per-sample contract between where samples come from (rollouts, reference solutions) and the
training step: one prompt, one response, and what the loss needs beside them.

The response is stored once. Its tokens follow the student prompt in the student sequence and,
for algorithms with a privileged side (OPSD's teacher), the teacher prompt in the teacher
sequence; both runs of response ids are therefore identical by construction, and packing keeps
them aligned token by token. Everything per response token (the sampler's log-probs, an
algorithm's advantages or old log-probs) travels with the sample into the packed micro-batches,
in the same order as the response-token targets, so nothing has to be re-joined after packing.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ROLLOUT_LOGPROBS = "rollout_logprobs"


@dataclass(frozen=True)
class Sample:
    """One training sample.

    - ``prompt_ids``: the student's prompt; the model is trained on ``prompt_ids + response_ids``.
    - ``teacher_prompt_ids``: the privileged side's prompt (problem + reference solution) that the
      teacher reads before the same response; None for algorithms without one.
    - ``rollout_logprobs``: the sampler's log-prob of each response token; None when the response
      was not sampled (SFT's reference solutions).
    - ``weight_version``: the weights the response was sampled with (None: not sampled).
    - ``token_extras``: named per-response-token values the loss reads (advantages, old log-probs).
    - ``group_id``: samples of the same prompt share it (n > 1 samples per prompt).
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    teacher_prompt_ids: tuple[int, ...] | None = None
    rollout_logprobs: tuple[float, ...] | None = None
    weight_version: int | None = None
    token_extras: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    group_id: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids or not self.response_ids:
            raise ValueError("a sample needs a non-empty prompt and a non-empty response")
        if self.teacher_prompt_ids is not None and not self.teacher_prompt_ids:
            raise ValueError("a sample's teacher prompt, when given, must not be empty")
        if ROLLOUT_LOGPROBS in self.token_extras:
            raise ValueError(f"{ROLLOUT_LOGPROBS!r} is reserved for Sample.rollout_logprobs, not a token extra")
        for name, values in self.per_token.items():
            if len(values) != len(self.response_ids):
                raise ValueError(f"{name}: {len(values)} values for {len(self.response_ids)} response tokens")

    @property
    def student_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.response_ids

    @property
    def teacher_ids(self) -> tuple[int, ...] | None:
        return None if self.teacher_prompt_ids is None else self.teacher_prompt_ids + self.response_ids

    @property
    def per_token(self) -> dict[str, tuple[float, ...]]:
        """Every per-response-token value the sample carries, the rollout's log-probs included."""
        values = dict(self.token_extras)
        if self.rollout_logprobs is not None:
            values[ROLLOUT_LOGPROBS] = self.rollout_logprobs
        return values


@dataclass(frozen=True)
class SampleLayout:
    """What every sample of one step shares: micro-batches and the loss are built for one layout."""

    two_sided: bool                # a teacher side
    per_token: tuple[str, ...]     # names of the per-token values, sorted


def common_layout(samples: Sequence[Sample]) -> SampleLayout:
    """The layout of ``samples``; an error naming the first sample that differs from sample 0."""
    if not samples:
        raise ValueError("no samples")
    layout = SampleLayout(samples[0].teacher_prompt_ids is not None, tuple(sorted(samples[0].per_token)))
    for i, s in enumerate(samples):
        if (s.teacher_prompt_ids is not None) != layout.two_sided:
            raise ValueError(f"sample {i} {'lacks' if layout.two_sided else 'has'} a teacher side, sample 0 "
                             f"{'has' if layout.two_sided else 'does not'}")
        if tuple(sorted(s.per_token)) != layout.per_token:
            raise ValueError(f"sample {i} carries per-token values {sorted(s.per_token)}, sample 0 {list(layout.per_token)}")
    return layout
