"""The general part of configuration loading: dataclass fields with docs (and bounds), JSON to typed dataclasses
with every problem gathered, dotted ``key=value`` overrides, range checks, and the list of keys with their docs.

Used by :mod:`hgscale.config` for its one tree; knows nothing of its sections.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import field
from typing import Any

from hgscale.core.status import UserError


class ConfigError(UserError):
    """One or more problems with a configuration; ``problems`` lists each as a sentence."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        head = f"{source}: {len(self.problems)} problem(s)" if len(self.problems) > 1 else f"{source}:"
        super().__init__(head + ("\n  - " if len(self.problems) > 1 else " ") + "\n  - ".join(self.problems))


def fld(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None, **kw):
    """A dataclass field with its one-line doc and, for a number, its bound: ``ge=0`` (>= 0) or ``gt=0`` (> 0),
    checked by :func:`range_problems`. Mutable defaults are copied per instance."""
    meta = {"doc": doc, **({"ge": ge} if ge is not None else {}), **({"gt": gt} if gt is not None else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def range_problems(obj, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """Numbers out of range in a dataclass tree (the sections named in ``skip`` left out): every float must be
    finite (NaN and 1e400 = inf are refused), and every field with a bound (``fld(..., ge=1)``) must keep it."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        path, value = (f"{prefix}.{f.name}" if prefix else f.name), getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += [] if f.name in skip or value is None else range_problems(value, path)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        op, bound = (">", f.metadata["gt"]) if "gt" in f.metadata else (">=", f.metadata.get("ge"))
        ok = bound is None or (value > bound if op == ">" else value >= bound)
        if math.isfinite(value) and ok:
            continue
        need = ("a finite number" + (f" {op} {bound}" if bound is not None else "")) if not math.isfinite(value) \
            else f"{op} {bound}"
        out.append(f"{path} = {value} must be {need}" + (" seconds" if f.name.endswith("_s") else ""))
    return out


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "an object"}.get(tp, getattr(tp, "__name__", str(tp)))


_TYPE_OK = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    list: lambda v: isinstance(v, list),
    dict: lambda v: isinstance(v, dict),
}


def _coerce(value: Any, tp, path: str, problems: list[str]):
    """Check ``value`` against ``tp`` (one type or a union such as ``bool | str | list``); ints are accepted for
    floats. Returns the value or None on error."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if not any(_TYPE_OK[t](value) for t in options):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 80 else shown[:76] + "..."
        problems.append(f"{path} = {shown} has the wrong type: expected "
                        f"{' or '.join(_type_name(t) for t in options)}")
        return None
    try:
        return float(value) if tp is float else value
    except OverflowError:  # an integer of hundreds of digits
        problems.append(f"{path} = {str(value)[:20]}... is too large for a number")
        return None


def build(cls, data: Any, prefix: str, problems: list[str], presets: dict | None = None):
    """``cls`` from ``data``, each problem appended to ``problems``; ``presets`` maps a section ("model") to its
    named sizes."""
    presets = presets or {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'} must be an object, got {json.dumps(data)[:60]}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    if "size" in data and prefix in presets:  # a named size: its keys first, explicit keys override them
        sizes, size = presets[prefix], data["size"]
        if size and size not in sizes:
            problems.append(f"{prefix}.size = {size!r} is not one of {', '.join(sizes)}")
        elif size:
            kwargs.update(sizes[size])
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]}?" if close else \
                f"; valid keys: {', '.join(names)}"
            problems.append(f"unknown key {path}{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, path, problems, presets)
        else:
            v = _coerce(value, tp, path, problems)
            if v is not None:
                kwargs[key] = v
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"override {item!r} is not of the form section.key=value"])
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer of thousands of digits
        value = raw  # bare strings: model.hierarchy=12@1
    return key.strip().split("."), value


def with_overrides(root, data: dict, overrides: list[str], problems: list[str]) -> dict:
    """``data`` with dotted ``key=value`` overrides applied; the dataclass ``root`` types the values."""
    for item in overrides or []:
        try:
            keys, value = _parse_override(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        node, cls = data, root
        for i, k in enumerate(keys[:-1]):
            hints = typing.get_type_hints(cls) if cls else {}
            cls = hints.get(k) if dataclasses.is_dataclass(hints.get(k)) else None
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {'.'.join(keys[:i + 1])} is not a section")
                break
        else:
            # a string given for a numeric field stays a string and fails the type check with its path
            hints = typing.get_type_hints(cls) if cls else {}
            if hints.get(keys[-1]) is str and not isinstance(value, str):
                value = item.split("=", 1)[1]
            node[keys[-1]] = value
    return data


def field_docs(cls, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every field of the tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_docs(hints[f.name], key)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((key, f.metadata.get("doc", ""), default))
    return out


def read_json_file(path) -> dict:
    """The JSON object in ``path``; a missing, unreadable, binary or non-object file is one ConfigError."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; pass an existing JSON file "
                           f"(see configs/)"], str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(["is not a text file (not UTF-8): pass a JSON config (see configs/)"], str(path)) from None
    except OSError as e:
        raise ConfigError([f"cannot be read ({e.strerror}): check its permissions"], str(path)) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError; an integer of thousands of digits; deep nesting
        raise ConfigError([f"is not valid JSON: {str(e)[:200] or type(e).__name__}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"holds {type(data).__name__}, not a JSON object of sections"], str(path))
    return data
