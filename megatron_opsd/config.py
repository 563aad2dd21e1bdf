"""One typed config tree: YAML file + dotted ``key=value`` CLI overrides, validated by pydantic.

Unknown keys are errors that name the key and suggest the closest known one.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so ``3``/``true``/``[1,2]`` work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _known_keys(schema: type[BaseModel], path: list[str]) -> list[str]:
    """Field names at ``path`` in the schema (follows nested Section fields)."""
    model: Any = schema
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = tree
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return tree


def _explain(err: ValidationError, schema: type[BaseModel], source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc)
        if e["type"] == "extra_forbidden":
            known = _known_keys(schema, loc[:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            lines.append(f"  unknown key {dotted!r}" + (f" (did you mean {'.'.join(loc[:-1] + hint)!r}?)" if hint else ""))
        else:
            lines.append(f"  {dotted}: {e['msg']}")
    return "\n".join(lines)


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read YAML at ``path`` (optional), apply dotted overrides, validate against ``schema``."""
    tree: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    apply_overrides(tree, list(overrides))
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, schema, source)) from None
