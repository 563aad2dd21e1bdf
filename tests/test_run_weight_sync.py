"""The weight sync inside a run: a corrupted or refused sync stops it at the probe check, before any step;
replaced engines and syncs; the in-process engine shares the trainer's weights only when that is right."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.data.sources import load_problems
from megatron_opsd.errors import UserError
from megatron_opsd.rollout.embedded import WeightSyncError
from megatron_opsd.rollout.engine import ProbeMismatchError, Rollout
from megatron_opsd.rollout.recorded import RecordedRolloutEngine
from megatron_opsd.rollout.sync.inprocess import InProcessSync
from megatron_opsd.tracking import read_metrics
from megatron_opsd.train.components import build_components
from megatron_opsd.train.loop import train
from tests.support.train_configs import load_train, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


class AlteredInTransit:
    """The embedded engine, receiving weights that ``alter(name, tensor)`` changed on the way."""

    def __init__(self, engine, alter):
        self.engine, self.alter = engine, alter

    def __getattr__(self, name):  # everything else is the engine's
        return getattr(self.engine, name)

    def update_weights(self, tensors, version, **options):
        self.engine.update_weights((self.alter(name, tensor) for name, tensor in tensors), version, **options)


def altered_sync(alter):
    """``build_components`` with a weight sync whose weights are altered on the way into the engine."""

    def build(cfg):
        c = build_components(cfg)
        probe = c.weight_sync.probe
        return replace(c, weight_sync=InProcessSync(AlteredInTransit(c.engine, alter), c.chunks, probe))

    return build


def test_a_corrupted_weight_sync_stops_the_run(tmp_path, hf_dir):
    path = write_config(tmp_path, hf_dir)
    down = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(ProbeMismatchError) as error:
        train(load_train(path), altered_sync(lambda name, t: (name, t + 0.05 if name == down else t)))
    assert re.fullmatch(r"after weight sync 0, .* > rollout.sync.probe_tolerance=0.001: the weights did not "
                        r"arrive intact .*", str(error.value)), error.value
    assert not (tmp_path / "run" / "ckpt").exists()
    # A user error of the commands that run the loop: one clear line, no traceback.
    assert issubclass(ProbeMismatchError, UserError)


def test_a_weight_stream_the_engine_refuses_stops_the_run(tmp_path, hf_dir):
    rename = altered_sync(lambda name, t: (name.replace("mlp.down_proj", "mlp.down"), t))
    with pytest.raises(WeightSyncError, match="model.layers.0.mlp.down.weight: unknown name"):
        train(load_train(write_config(tmp_path, hf_dir)), rename)


class CountingSync:
    """A weight sync that only counts the versions it is asked to push."""

    def __init__(self):
        self.versions = []

    def push(self, version):
        self.versions.append(version)
        return {}

    def close(self):
        pass


def test_recorded_rollouts_and_a_counting_sync_replace_the_engine_and_the_sync(tmp_path, hf_dir):
    """The engine comes from the factory (rollout.engine.kind=recorded); the sync is replaced as a
    component: the loop pushes before step 1 and every rollout.sync.interval steps, and trains on
    exactly the recorded rollouts."""
    cfg = load_train(write_config(tmp_path, hf_dir, steps=5, eval={"data": None}, checkpoint={"enabled": False}),
                     "rollout.engine.kind=recorded", f"rollout.engine.path={tmp_path / 'rollouts.jsonl'}",
                     "rollout.sync.kind=none", "rollout.sync.interval=2")
    builder = PromptBuilder(AutoTokenizer.from_pretrained(cfg.tokenizer), cfg.prompts)
    RecordedRolloutEngine({tuple(builder.student_ids(p)): [Rollout((5, 6, 7), (-1.0, -2.0, -3.0), "length")]
                           for p in load_problems(cfg.data).problems}).save(tmp_path / "rollouts.jsonl")
    sync = CountingSync()
    train(cfg, lambda cfg: replace(build_components(cfg), weight_sync=sync))
    assert sync.versions == [0, 2, 4]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["response_len_max"] == 3 and r["truncation_rate"] == 1 and r["response_tokens"] == 9 for r in records)
    # The engine's log-probs travel with the samples: the mismatch is against the recorded -1, -2, -3.
    assert all(r["mismatch/logprob_abs_diff_mean"] > 0.5 for r in records)
    assert not any(key.startswith("probe/") for r in records for key in r)


@pytest.mark.parametrize("overrides, shared", [((), True), (("rollout.sync.interval=2",), False),
                                               (("rollout.async=1",), False)])
def test_the_inprocess_engine_holds_the_trainers_weights_only_when_synced_every_step(tmp_path, hf_dir, overrides,
                                                                                      shared):
    """Synced every step without rollouts ahead, the engine's parameters are the trainer's own
    storage (all but the split QKV at TP 1); otherwise each push copies into the engine's own."""
    c = build_components(load_train(write_config(tmp_path, hf_dir, eval={"data": None}, checkpoint={"enabled": False}),
                                    *overrides))
    c.weight_sync.push(1)
    trainer = {p.untyped_storage().data_ptr() for chunk in c.chunks for p in chunk.parameters()}
    engine = {name: p for name, p in c.engine.model.named_parameters()}
    adopted = {name for name, p in engine.items() if p.untyped_storage().data_ptr() in trainer}
    if shared:
        assert {name for name in engine if name not in adopted} == {
            name for name in engine if re.search(r"self_attn\.[qkv]_proj", name)}
    else:
        assert not adopted
    assert c.engine.weight_version == 1
