"""The general part of configuration loading: dataclass fields with docs, JSON to typed dataclasses with every
problem gathered, dotted ``key=value`` overrides, and the list of keys with their docs.

Used by :mod:`hgscale.config` for its one tree; knows nothing of its sections.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """One or more problems with a configuration; ``problems`` lists each as a sentence."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        head = f"{source}: {len(self.problems)} problem(s)" if len(self.problems) > 1 else f"{source}:"
        super().__init__(head + ("\n  - " if len(self.problems) > 1 else " ") + "\n  - ".join(self.problems))


def fld(default: Any, doc: str, **kw):
    """A dataclass field with its one-line doc. Mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "an object"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, path: str, problems: list[str]):
    """Check ``value`` against ``tp``; ints are accepted for floats. Returns the value or None on error."""
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[tp]
    if not ok(value):
        problems.append(f"{path} = {json.dumps(value)} has the wrong type: expected {_type_name(tp)}")
        return None
    return float(value) if tp is float else value


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
    except json.JSONDecodeError:
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
    except json.JSONDecodeError as e:
        raise ConfigError([f"is not valid JSON: {e}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"holds {type(data).__name__}, not a JSON object of sections"], str(path))
    return data
