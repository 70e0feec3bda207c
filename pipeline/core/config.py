"""Dataclass configs from defaults, a YAML file and ``key=value`` overrides.

Each stage has one dataclass config whose defaults work; users override it from a YAML file
(``--config stage.yaml``) and from the CLI (``--set key=value``, dotted keys for nested
dataclasses). Values are parsed as YAML scalars (``--set stop_iou=0.75``, ``--set rounds=[1,2]``).
Unknown keys are errors that name the key and the allowed ones. No config file is executed.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section")
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b": {"c": "x"}}``."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_nested(out, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[C], data: dict[str, Any], *, where: str = "") -> C:
    """Build dataclass ``cls`` from a dict, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown key(s) {unknown}; "
                         f"allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        tp = hints.get(name)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=f"{where or cls.__name__}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain JSON/YAML-safe dict."""
    return dataclasses.asdict(cfg)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                section: str | None = None, **explicit: Any) -> C:
    """Defaults <- YAML file (optionally one ``section`` of it) <- ``overrides`` <- ``explicit``.

    ``explicit`` holds CLI options the user actually gave (None values are ignored).
    """
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if section is not None:
            loaded = loaded.get(section, {}) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r}: expected a mapping at the top level")
        data = loaded
    data = _merge(data, parse_overrides(overrides))
    data = _merge(data, {k: v for k, v in explicit.items() if v is not None})
    return from_dict(cls, data)
