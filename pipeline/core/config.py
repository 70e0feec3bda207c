"""Dataclass configs from defaults, a YAML file and ``key=value`` overrides.

Each stage has one dataclass config whose defaults work; users override it from a YAML file
(``--config stage.yaml``) and from the CLI (``--set key=value``, dotted keys for nested
dataclasses). An override's text is converted by the type of the field it sets, never by YAML's
guess: ``--set precompute=off`` stays the text ``"off"`` for a ``str`` field, ``--set
stop_iou=0.75`` is a float for a ``float`` field, ``--set rounds=[1,2]`` a list for a ``list[int]``
field (lists and mappings are read as YAML whose scalars are then converted by the element type).
Unknown keys are errors that name the key and the allowed ones. No config file is executed.
"""

from __future__ import annotations

import dataclasses
import types
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


def parse_overrides(overrides: list[str] | None, cls: type | None = None) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b": {"c": "x"}}``.

    With ``cls`` (a dataclass) each value is converted by the type of the field it sets
    (:func:`coerce`); without it, values are read as YAML scalars.
    """
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if cls is None:
            value = yaml.safe_load(raw) if raw != "" else ""
        else:
            value = coerce(raw, _field_type(cls, key), key)
        _set_nested(out, key, value)
    return out


def _field_type(cls: type, dotted: str) -> Any:
    """The type hint of the field a dotted key names (``Any`` below a non-dataclass field);
    unknown keys are left for :func:`from_dict` to report with the allowed ones."""
    tp: Any = cls
    for name in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return Any
        hints = typing.get_type_hints(tp)
        if name not in hints:
            return Any
        tp = hints[name]
    return tp


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NULL = ("null", "none", "~", "")


def coerce(raw: Any, tp: Any, where: str = "value") -> Any:
    """Convert override text (or a list/mapping of texts) to type ``tp``.

    ``str`` keeps the text; ``bool`` accepts true/false/yes/no/on/off/1/0; ``int`` and
    ``float`` parse numbers; ``X | None`` also accepts null/none/~/empty; lists, tuples and
    mappings are read as YAML with every scalar kept as text, then converted element by
    element; a nested dataclass from a mapping. ValueError names ``where``, the text and the
    expected type.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is None:
        return yaml.safe_load(raw) if isinstance(raw, str) and raw != "" else raw
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if type(None) in args and isinstance(raw, str) and raw.strip().lower() in _NULL:
            return None
        for option in options:
            try:
                return coerce(raw, option, where)
            except ValueError:
                continue
        raise ValueError(f"{where}={raw!r}: expected {_type_name(tp)}")
    if origin is typing.Literal:
        if raw in args:
            return raw
        raise ValueError(f"{where}={raw!r}: allowed {list(args)}")
    if origin in (list, tuple, set, dict) or tp in (list, tuple, set, dict):
        data = _structured(raw, where)
        if origin is dict or tp is dict:
            if not isinstance(data, dict):
                raise ValueError(f"{where}={raw!r}: expected a mapping like {{a: 1}}")
            vt = args[1] if len(args) == 2 else Any
            return {k: coerce(v, vt, f"{where}.{k}") for k, v in data.items()}
        if not isinstance(data, list):
            raise ValueError(f"{where}={raw!r}: expected a list like [1, 2]")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        items = [coerce(v, args[i] if len(args) > 1 else (args[0] if args else Any),
                        f"{where}[{i}]") for i, v in enumerate(data)]
        kind = origin or tp
        return items if kind is list else kind(items)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        data = _structured(raw, where)
        if not isinstance(data, dict):
            raise ValueError(f"{where}={raw!r}: expected a mapping of {tp.__name__} fields")
        hints = typing.get_type_hints(tp)
        return {k: coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()}
    if not isinstance(raw, str):
        raise ValueError(f"{where}={raw!r}: expected {_type_name(tp)}")
    text = raw.strip()
    if tp is str:  # a quoted text (YAML habit) is the text inside the quotes
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return raw
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{where}={raw!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}={raw!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}={raw!r}: expected a number") from None
    return yaml.safe_load(raw) if raw != "" else raw


def _structured(raw: Any, where: str) -> Any:
    if not isinstance(raw, str):
        return raw
    try:  # BaseLoader: every scalar stays text, converted afterwards by the field's type
        return yaml.load(raw, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds no objects
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}={raw!r} is not valid YAML: {exc}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


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
        elif tp is str and isinstance(value, bool):  # YAML 1.1 reads off/no/yes/on as booleans
            raise ValueError(f"{where or cls.__name__}.{name}={value!r}: expected text; quote "
                             "it in YAML (e.g. 'off')")
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
    data = _merge(data, parse_overrides(overrides, cls))
    data = _merge(data, {k: v for k, v in explicit.items() if v is not None})
    return from_dict(cls, data)
