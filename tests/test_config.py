"""The config tree's reference and key walk: optional sections, containers and choices of sections, descriptions."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Discriminator, Field, Tag, ValidationError

from megatron_opsd.algorithms.opsd.teacher import TeacherConfig
from megatron_opsd.config import ConfigError, config_keys, config_reference, load_config
from megatron_opsd.section import Section
from megatron_opsd.train.optim import OptimConfig


class Inner(Section):
    width: int = Field(default=1, description="how wide")


class Outer(Section):
    maybe: Inner | None = Field(default=None, description="optional inner")
    items: list[Inner] = Field(default_factory=list, description="a list of inner sections")
    named: dict[str, Inner] = Field(default_factory=dict, description="inner sections by name")
    plot: dict[str, list[str]] = Field(default_factory=dict, description="not sections")


def test_keys_descend_into_optional_sections_and_containers():
    keys = {k.key: k for k in config_keys(Outer)}
    assert list(keys) == ["maybe", "maybe.width", "items", "items[].width", "named", "named.<name>.width", "plot"]
    assert [k for k, v in keys.items() if v.is_leaf] == ["maybe.width", "items[].width", "named.<name>.width", "plot"]
    assert keys["maybe"].section is Inner and keys["items"].section is Inner and keys["plot"].section is None


def test_reference_shows_container_types_and_optional_section_defaults():
    text = config_reference(Outer, how="test")
    assert text.splitlines()[0] == "config keys (test):"
    assert "  maybe (Inner | None, default None): optional inner\n  maybe.width (int, default 1): how wide" in text
    assert "  items (list[Inner], default []): a list of inner sections" in text
    assert "  named.<name>.width (int, default 1): how wide" in text
    assert "  plot (dict[str, list[str]], default {}): not sections" in text


def test_unknown_key_in_an_optional_section_gets_a_suggestion():
    assert load_config(Outer, None, ["maybe.width=3"]).maybe.width == 3
    with pytest.raises(ConfigError, match=r"unknown key 'maybe.widht' \(did you mean 'maybe.width'\?\)"):
        load_config(Outer, None, ["maybe.widht=3"])


def test_training_reference_includes_the_optional_eval_data_section():
    from megatron_opsd.train.config import TrainConfig

    text = config_reference(TrainConfig)
    assert "\n  eval.data (DataConfig | None, default None): held-out problems" in text
    assert "\n  eval.data.path (str | None, default None): local file" in text
    assert "\n  eval.data.fields.solution (str | None, default 'solution'): " in text


def test_every_training_key_has_a_description():
    from megatron_opsd.train.config import TrainConfig

    leaves = [k for k in config_keys(TrainConfig) if k.is_leaf]
    assert len(leaves) > 100 and "eval.data.seed" in {k.key for k in leaves}
    undocumented = [k.key for k in leaves if not k.field.description]
    assert undocumented == [], f"config keys without Field(description=...): {undocumented}"


class Plain(Section):
    kind: Literal["plain"] = Field(default="plain", description="the plain one")
    width: int = Field(default=1, description="how wide")


class Fancy(Section):
    kind: Literal["fancy"] = Field(description="the fancy one")
    width: int = Field(default=2, description="how wide")
    path: str = Field(description="where")


class Chooser(Section):
    engine: Annotated[Annotated[Plain, Tag("plain")] | Annotated[Fancy, Tag("fancy")],
                      Discriminator(lambda v: v.get("kind", "plain") if isinstance(v, dict) else v.kind)] = Plain()


def test_a_choice_of_sections_lists_each_key_once_with_its_variant():
    keys = {k.key: k for k in config_keys(Chooser)}
    assert list(keys) == ["engine", "engine.kind", "engine.width", "engine.path"]
    assert keys["engine.path"].variant == "kind fancy" and keys["engine.width"].variant is None
    text = config_reference(Chooser)
    assert "  engine.kind ('plain' | 'fancy', default 'plain'): plain: the plain one; fancy: the fancy one" in text
    assert "  engine.path (str, required; kind fancy): where" in text


def test_errors_in_a_chosen_section_name_keys_without_the_tag():
    assert load_config(Chooser, None, ["engine.width=3"]).engine == Plain(width=3)  # no kind: the default choice
    with pytest.raises(ConfigError) as error:
        load_config(Chooser, None, ["engine.kind=fancy", "engine.paht=x"])
    assert "  engine.path: Field required" in str(error.value)
    assert "unknown key 'engine.paht' (did you mean 'engine.path'?)" in str(error.value)


def test_training_on_reference_solutions_needs_the_solution_field():
    from megatron_opsd.train.config import TrainConfig

    tiny = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"
    for name in ("opsd", "sft"):
        with pytest.raises(ConfigError, match=f"algorithm.name={name} trains on reference solutions"):
            load_config(TrainConfig, tiny, [f"algorithm.name={name}", "data.fields.solution=null"])
    assert load_config(TrainConfig, tiny, ["algorithm.name=grpo", "data.fields.solution=null"]).data.fields.solution is None


def test_sections_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        OptimConfig(learning_rate=1.0)
    with pytest.raises(ValidationError):
        TeacherConfig(mode="ema", ema_decay=1.0)
    assert OptimConfig().clip_grad == 0.1 and TeacherConfig().mode == "fixed"
