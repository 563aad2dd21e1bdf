"""One typed config tree: YAML file + dotted ``key=value`` CLI overrides, validated by pydantic.

Unknown keys are errors that name the key and suggest the closest known one. :func:`config_keys`
walks a schema (into optional sections, lists/dicts of sections, and choices of sections told apart
by a discriminator field such as ``kind``); :func:`config_reference` renders it for the commands'
``--help``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from megatron_opsd.errors import UserError

T = TypeVar("T", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


class LayoutError(ConfigError):
    """A parallel layout that does not fit the world size or the model (parallel.tp / parallel.pp)."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so ``3``/``true``/``[1,2]`` work).

    Text that is not YAML, and braces YAML would read as a mapping of keys without values (prompt
    templates such as ``{problem}``), stay the text they are.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        value = raw
    return key.strip().split("."), value


@dataclass(frozen=True)
class ConfigKey:
    """One key of a schema: its dotted name, its pydantic field and, for a field that holds a
    section (``S``, ``S | None``, ``list[S]``, ``dict[str, S]``), that section's class (for a
    choice of sections, the first). ``variant`` marks a key that only some sections of a choice
    have, e.g. ``kind recorded``."""

    key: str
    field: FieldInfo
    section: type[BaseModel] | None = None
    variant: str | None = None

    @property
    def is_leaf(self) -> bool:
        return self.section is None


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (``X | Y | None`` -> ``X | Y``); anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = tuple(a for a in get_args(annotation) if a is not type(None))
        return rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007 - built from a tuple of members
    return annotation


def _bare(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X`` (a choice's members carry their tags that way)."""
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _nested(annotation: Any) -> tuple[tuple[type[BaseModel], ...], str]:
    """The sections a field holds (one, or the choices of a union of sections) and how its keys
    continue below the field's own key: ``.`` for a section (optional or not), ``[].`` for a list
    of them, ``.<name>.`` for a dict of them. No sections: ``()``."""
    annotation = _without_none(annotation)
    if _is_section(annotation):
        return (annotation,), "."
    origin, args = get_origin(annotation), tuple(map(_bare, get_args(annotation)))
    if origin in (Union, types.UnionType) and args and all(map(_is_section, args)):
        return args, "."
    if origin in (list, tuple, set, frozenset) and args:
        element, suffix = _nested(args[0])
        return (element, "[]" + suffix) if element else ((), "")
    if origin is dict and len(args) == 2:
        element, suffix = _nested(args[1])
        return (element, ".<name>" + suffix) if element else ((), "")
    return (), ""


def _tag_field(choices: tuple[type[BaseModel], ...]) -> str | None:
    """The field that tells a choice of sections apart: one every choice has as a ``Literal``."""
    for name in choices[0].model_fields:
        if all(get_origin(getattr(c.model_fields.get(name), "annotation", None)) is Literal for c in choices):
            return name
    return None


def _tag(section: type[BaseModel], choices: tuple[type[BaseModel], ...]) -> str | None:
    """``kind recorded`` for the section of a choice whose tag field is ``kind: Literal["recorded"]``."""
    name = _tag_field(choices)
    return None if name is None else f"{name} {' | '.join(map(str, get_args(section.model_fields[name].annotation)))}"


def _tags_of(sections: list[type[BaseModel]], choices: tuple[type[BaseModel], ...]) -> str | None:
    """``kind sglang | vllm``: the tags of ``sections``, some of a choice."""
    tag_field = _tag_field(choices)
    if tag_field is None:
        return None
    values = [str(v) for s in sections for v in get_args(s.model_fields[tag_field].annotation)]
    return f"{tag_field} {' | '.join(values)}"


def _tag_key(choices: tuple[type[BaseModel], ...]) -> tuple[str, FieldInfo] | None:
    """The tag field of a choice as one key: every choice's value, each with its description."""
    name = _tag_field(choices)
    if name is None:
        return None
    fields = [c.model_fields[name] for c in choices]
    values = tuple(v for f in fields for v in get_args(f.annotation))
    described = "; ".join(f"{v}: {f.description}" for f in fields for v in get_args(f.annotation) if f.description)
    return name, FieldInfo(annotation=Literal[values], default=fields[0].default, description=described or None)


def config_keys(schema: type[BaseModel], prefix: str = "") -> Iterator[ConfigKey]:
    """Every key of ``schema`` in definition order, each section followed by its own keys (for a
    choice of sections, the keys of each, each key once)."""
    for name, field in schema.model_fields.items():
        key = prefix + (field.alias or name)
        sections, suffix = _nested(field.annotation)
        yield ConfigKey(key, field, sections[0] if sections else None)
        seen: set[str] = set()
        tag_key = _tag_key(sections) if len(sections) > 1 else None
        if tag_key is not None:
            seen.add(key + suffix + tag_key[0])
            yield ConfigKey(key + suffix + tag_key[0], tag_key[1])
        subs = [list(config_keys(section, key + suffix)) for section in sections]
        keysets = [{sub.key for sub in keys} for keys in subs]
        for keys in subs:
            for sub in keys:
                if sub.key not in seen:
                    seen.add(sub.key)
                    having = [s for s, keyset in zip(sections, keysets, strict=True) if sub.key in keyset]
                    yield sub if len(having) == len(sections) else dataclasses.replace(
                        sub, variant=sub.variant or _tags_of(having, sections))


def _type_name(annotation: Any) -> str:
    annotation = _bare(annotation)
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
        variant = f"; {item.variant}" if item.variant else ""
        lines.append(f"  {item.key} ({_type_name(field.annotation)}, {default}{variant}){note}")
    return "\n".join(lines)


def _config_path(schema: type[BaseModel], loc: list[str]) -> tuple[list[str], list[type[BaseModel]]]:
    """A pydantic error location as config keys (without the tags pydantic inserts after a choice of
    sections), and the sections the last key may belong to (none below a list/dict of sections)."""
    path: list[str] = []
    models: list[type[BaseModel]] = [schema]
    rest = list(loc)
    while rest:
        part = rest.pop(0)
        path.append(part)
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return path + rest, []
        sections, suffix = _nested(fields[0].annotation)
        if not sections or suffix != ".":  # a leaf, or a list/dict of sections: an index or name comes next
            return path + rest, []
        if len(sections) > 1 and rest:  # pydantic names the chosen section by its tag
            tag, rest = rest[0], rest[1:]
            chosen = [s for s in sections if (_tag(s, sections) or "").endswith(f" {tag}")]
            sections = tuple(chosen) or sections
        models = list(sections)
    return path, models


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
        if e["type"] == "extra_forbidden":
            parent, models = _config_path(schema, loc[:-1])
            known = [field.alias or name for m in models for name, field in m.model_fields.items()]
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            dotted = ".".join(parent + loc[-1:])
            lines.append(f"  unknown key {dotted!r}" + (f" (did you mean {'.'.join(parent + hint)!r}?)" if hint else ""))
        else:
            dotted = ".".join(_config_path(schema, loc)[0])
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {dotted}: {message}" if dotted else f"  {message}")
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
