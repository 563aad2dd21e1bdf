"""One typed config tree: YAML file + dotted ``key=value`` CLI overrides, validated by pydantic.

Unknown keys are errors that name the key and suggest the closest known one. :func:`config_keys`
walks a schema (into optional sections and lists/dicts of sections too); :func:`config_reference`
renders it for the commands' ``--help``.
"""
from __future__ import annotations

import difflib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so ``3``/``true``/``[1,2]`` work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


@dataclass(frozen=True)
class ConfigKey:
    """One key of a schema: its dotted name, its pydantic field and, for a field that holds a
    section (``S``, ``S | None``, ``list[S]``, ``dict[str, S]``), that section's class."""

    key: str
    field: FieldInfo
    section: type[BaseModel] | None = None

    @property
    def is_leaf(self) -> bool:
        return self.section is None


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The section a field holds and how its keys continue below the field's own key: ``.`` for a
    section (optional or not), ``[].`` for a list of them, ``.<name>.`` for a dict of them."""
    annotation = _without_none(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "."
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple, set, frozenset) and args:
        element, suffix = _nested(args[0])
        return (element, "[]" + suffix) if element is not None else (None, "")
    if origin is dict and len(args) == 2:
        element, suffix = _nested(args[1])
        return (element, ".<name>" + suffix) if element is not None else (None, "")
    return None, ""


def config_keys(schema: type[BaseModel], prefix: str = "") -> Iterator[ConfigKey]:
    """Every key of ``schema`` in definition order, each section followed by its own keys."""
    for name, field in schema.model_fields.items():
        key = prefix + name
        section, suffix = _nested(field.annotation)
        yield ConfigKey(key, field, section)
        if section is not None:
            yield from config_keys(section, key + suffix)


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(map(_type_name, args))}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def config_reference(schema: type[BaseModel], how: str = "YAML via --config, or key=value") -> str:
    """One line per config key with its type, default and description: a command's ``--help`` epilog.

    A section that is always present is a heading (its description, if any); an optional one
    (``S | None``) also shows its default, since setting it to null is a choice of its own.
    """
    lines = [f"config keys ({how}):"]
    for item in config_keys(schema):
        field, note = item.field, f": {item.field.description}" if item.field.description else ""
        if item.section is not None and field.annotation is item.section:
            if note:
                lines.append(f"  {item.key}{note}")
            continue
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"  {item.key} ({_type_name(field.annotation)}, {default}){note}")
    return "\n".join(lines)


def _known_keys(schema: type[BaseModel], path: list[str]) -> list[str]:
    """Field names at ``path`` in the schema (follows sections, optional ones included)."""
    model: type[BaseModel] | None = schema
    for part in path:
        field = model.model_fields.get(part)
        model, suffix = _nested(field.annotation) if field is not None else (None, "")
        if model is None or suffix != ".":  # a list/dict of sections: the path holds an index or name next
            return []
    return list(model.model_fields)


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
