"""`deliberate-ray config show [SECTION]`: every config field with its type, default, bounds
and description, read from the pydantic models in `config.py` (the single source).

Defaults are the ones in effect where a field sits: a section whose default is built with
other values (e.g. `generate.judge.llm.sampling`, max_tokens 128) shows those.
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from deliberate_ray.config import Config

WIDTH = 100
INDENT = "  "
_REQUIRED = object()  # a field without a default


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def type_name(tp: Any) -> str:
    """A readable type: `int`, `list[str]`, `cot | no_cot`, `str | None`, `EngineConfig`."""
    if tp is type(None) or tp is None:
        return "None"
    if tp is Any:
        return "Any"
    args = _union_args(tp)
    if args is not None:
        parts = [type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("None")
        return " | ".join(parts)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin is not None:
        inner = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def nested_model(tp: Any) -> tuple[type[BaseModel], bool] | None:
    """The model a field holds, and whether it holds a list of them; None for plain values."""
    args = _union_args(tp)
    if args is not None:
        found = [m for a in args if a is not type(None) and (m := nested_model(a))]
        return found[0] if len(found) == 1 else None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, False
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None


def bounds(info: FieldInfo) -> str:
    """ge/gt/le/lt, length and pattern constraints from the field's metadata."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = []
    for meta in info.metadata:
        for attr, sign in signs.items():
            if getattr(meta, attr, None) is not None:
                out.append(f"{sign} {_value(getattr(meta, attr))}")
        if getattr(meta, "min_length", None) is not None:
            out.append(f"min length {meta.min_length}")
        if getattr(meta, "max_length", None) is not None:
            out.append(f"max length {meta.max_length}")
        if getattr(meta, "pattern", None) is not None:
            out.append(f"pattern {meta.pattern}")
    return ", ".join(out)


def _value(v: Any) -> str:
    """A value as it would be written in the YAML config (JSON, which YAML reads)."""
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    elif isinstance(v, list) and any(isinstance(x, BaseModel) for x in v):
        v = [x.model_dump(mode="json") if isinstance(x, BaseModel) else x for x in v]
    return json.dumps(v, default=str)


def field_default(info: FieldInfo) -> Any:
    """The field's default (default_factory evaluated), or _REQUIRED."""
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    if info.default is PydanticUndefined:
        return _REQUIRED
    return info.default


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        " ".join(text.split()),
        WIDTH,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _summary(cls: type[BaseModel]) -> str:
    """The model docstring's first paragraph, on one line."""
    doc = (cls.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def _section(
    path: str, cls: type[BaseModel], instance: BaseModel | None, depth: int, note: str = ""
) -> list[str]:
    pad = INDENT * depth
    head = f"{pad}[{path}] {cls.__name__}" if path else f"{pad}{cls.__name__}"
    lines = [head + (f" ({note})" if note else "")]
    if summary := _summary(cls):
        lines += _wrap(summary, pad + INDENT)
    lines.append("")
    for name, info in cls.model_fields.items():
        lines += _field(f"{path}.{name}" if path else name, name, info, instance, depth + 1)
    return lines


def _field(
    path: str, name: str, info: FieldInfo, parent: BaseModel | None, depth: int
) -> list[str]:
    pad = INDENT * depth
    default = getattr(parent, name) if parent is not None else field_default(info)
    nested = nested_model(info.annotation)
    if default is _REQUIRED:
        shown = "required"
    elif nested and isinstance(default, BaseModel):
        shown = "(the fields below)"
    else:
        shown = _value(default)
    lines = [f"{pad}{path}"]
    parts = [f"type: {type_name(info.annotation)}", f"default: {shown}"]
    if bound := bounds(info):
        parts.append(f"bounds: {bound}")
    lines += _wrap("; ".join(parts), pad + INDENT * 2)
    lines += _wrap(info.description or "(no description)", pad + INDENT * 2)
    lines.append("")
    if nested:
        cls, many = nested
        if many:
            lines += _section(f"{path}[]", cls, None, depth, "each item of the list")
        elif isinstance(default, BaseModel):
            lines += _section(path, cls, default, depth)
        else:
            lines += _section(path, cls, None, depth, "optional; the defaults when it is given")
    return lines


def sections(cls: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted path of a nested model under `cls`, in field order."""
    out = []
    for name, info in cls.model_fields.items():
        if nested := nested_model(info.annotation):
            path = f"{prefix}{name}"
            out.append(path)
            out += sections(nested[0], path + ".")
    return out


def describe(section: str | None = None) -> str:
    """The fields of the whole `Config`, or of one section (`eval`, `generate.teacher`...).

    Raises ValueError naming the allowed sections for an unknown one."""
    if not section:
        return "\n".join(_section("", Config, Config(), 0)).rstrip() + "\n"
    allowed = sections()
    if section not in allowed:
        raise ValueError(f"unknown config section {section!r}; allowed: {', '.join(allowed)}")
    cls: type[BaseModel] = Config
    parent: BaseModel | None = Config()
    *outer, last = section.split(".")
    for part in outer:
        info = cls.model_fields[part]
        value = getattr(parent, part) if parent is not None else field_default(info)
        parent = value if isinstance(value, BaseModel) else None
        cls = nested_model(info.annotation)[0]  # type: ignore[index]
    lines = _field(section, last, cls.model_fields[last], parent, 0)
    return "\n".join(lines).rstrip() + "\n"
