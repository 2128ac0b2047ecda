"""Loading experiment parameters: YAML -> validated, frozen `Config`.

One YAML file per experiment, one section per stage (the sections the stages
declared, `sections.config_class`). Unknown keys, duplicate keys, wrong
types and impossible values fail at load time with the file and the dotted
key path, and so do dotted overrides (`--set`), which go through the same
validation and are named as such. Numbers in scientific notation (`1e-4`) are
numbers. Fields typed `Path` are resolved against the YAML file's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping


from .fields import ConfigError
from .parsing import MAX_FILE_BYTES, MAX_LIST_VALUES, parse_yaml
from .sections import Config, config_class
from .values import dump_config, flow_yaml, plain


# --------------------------------------------------------------------------- types
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0]) if args else 'value'}"
    if tp is type(None):
        return "null"
    return "path" if tp is Path else getattr(tp, "__name__", str(tp))


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(f"{key}: must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError(key)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise ConfigError(f"{key}: the section is empty; give its keys (indented below it) or delete the line")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # X | None: X's own message says what is wrong
            return _coerce(value, members[0], key)
        for a in members:
            with contextlib.suppress(ConfigError):
                return _coerce(value, a, key)
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a {_type_name(tp)}, got {value!r}")
        if len(value) > MAX_LIST_VALUES:
            raise ConfigError(f"{key}: at most {MAX_LIST_VALUES} values, got {len(value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: must have exactly {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        return _number(value, key)
    if tp in (bool, int, str) and (type(value) is tp or (tp is int and isinstance(value, int)
                                                       and not isinstance(value, bool))):
        return value
    if tp is Path and isinstance(value, str) and value:
        return Path(os.path.expandvars(os.path.expanduser(value)))  # an unset $VAR stays: the reader names it
    wanted = {bool: "true or false", int: "an integer", str: "a string", Path: "a path"}.get(tp)
    if wanted is None:
        raise TypeError(f"unsupported parameter type {tp!r} at {key}")  # programming error
    raise ConfigError(f"{key}: must be {wanted}, got {value!r}")


RENAMED = {"segmentation.upper_bound": "segmentation.bound",  # one name for the bound (issue #36)
           "segmentation.upper_bound_epochs": "segmentation.bound_epochs"}


def _unknown(key: str, known: str) -> str:
    """The line for a key no section has: its new name when it was renamed, else the known keys."""
    if key in RENAMED:
        return f"{key}: renamed {RENAMED[key]}"
    return f"{key}: unknown key{known}"


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(_unknown(f"{where}{unknown[0]}", f" (known keys in {prefix or 'the top level'}: "
                                   f"{', '.join(sorted(fields))})"), f"{where}{unknown[0]}")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            value = raw[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping) and \
                    f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                # keys the YAML leaves out keep this section's own defaults
                value = {**plain(f.default_factory()), **value}  # type: ignore[misc]
            try:
                v = _coerce(value, hints[name], key)
            except ConfigError as e:
                raise ConfigError(str(e), e.key or key) from None
        else:
            v = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        check = f.metadata.get("check")
        msg = check(v) if check is not None else None
        if msg:
            raise ConfigError(f"{key}: {msg}", key)
        values[name] = v
    built = cls(**values)
    problem = built.problem() if hasattr(built, "problem") else None  # rules across a section's fields
    if problem:
        field_name, msg = problem
        key = f"{prefix}.{field_name}" if prefix else field_name
        raise ConfigError(f"{key}: {msg}", key)
    return built


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any], cls: type | None = None) -> dict[str, Any]:
    """Set dotted keys (`cams.scales`) in a copy of the raw mapping, checking each key exists."""
    out = json.loads(json.dumps(raw)) if raw else {}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"override {dotted!r}: empty key component", dotted)
        node, section = out, cls or config_class()
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(section)} if dataclasses.is_dataclass(section) else set()
            if part not in names:
                known = f" (known keys in {'.'.join(parts[:i])}: {', '.join(sorted(names))})" if i and names else ""
                raise ConfigError(_unknown('.'.join(parts[: i + 1]), known), dotted)
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(typing.get_type_hints(section)[part]):
                    raise ConfigError(f"{dotted}: is a section; set its keys one by one (e.g. {dotted}.<key>=...), "
                                      "so the file's other values stay", dotted)
                node[part] = plain(value)
            else:
                section = typing.get_type_hints(section)[part]
                nxt = node.setdefault(part, {})
                if not isinstance(nxt, dict):
                    raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section", dotted)
                node = nxt
    return out


# --------------------------------------------------------------------------- building
def _resolve_paths(obj: Any, base: Path) -> Any:
    """Every `Path` value made absolute against `base` (notebooks run in notebooks/,
    so a relative path must not depend on the working folder)."""
    changes = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            changes[f.name] = _resolve_paths(v, base)
        elif isinstance(v, Path) and not v.is_absolute():
            changes[f.name] = (base / v).resolve()
    return dataclasses.replace(obj, **changes) if changes else obj


def _check_weight_files(obj: Any, prefix: str = "") -> None:
    """A weights spec that is a path must name an existing file (found at load time, not mid-run)."""
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            _check_weight_files(v, f"{key}.")
        elif f.name == "weights" and isinstance(v, Path) and not v.is_file():
            raise ConfigError(f"{key}: weights file not found: {v} (or use 'imagenet' / 'random')", key)


def _check_round_trip(cfg: Config) -> None:
    """Every value must come back unchanged from the run's config.yaml and
    manifests (JSON): a string that UTF-8 cannot encode would otherwise fail a
    stage after it started."""
    data = plain(cfg)
    for key, value in _leaves(data):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{key}: {value!r} is not valid text (UTF-8 cannot encode it)", key) from None
    for back in (json.loads(json.dumps(data, allow_nan=False)), parse_yaml(dump_config(cfg), "config")):
        changed = [k for (k, v), (_, w) in zip(_leaves(data), _leaves(back)) if v != w]
        if back != data:
            key = changed[0] if changed else None
            raise ConfigError(f"{key or 'the parameters'}: does not survive the round trip through the run's "
                              "JSON and YAML files", key)


def _leaves(v: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(v, dict):
        return [leaf for k, x in v.items() for leaf in _leaves(x, f"{prefix}.{k}" if prefix else k)]
    if isinstance(v, list):
        return [leaf for i, x in enumerate(v) for leaf in _leaves(x, f"{prefix}[{i}]")]
    return [(prefix, v)]


def config_from_dict(raw: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None,
                     base_dir: str | Path = ".") -> Config:
    """Build and validate a Config from a raw mapping (plus dotted overrides)."""
    cls = config_class()
    raw = dict(raw or {})
    if overrides:
        raw = apply_overrides(raw, overrides, cls)
    cfg = _resolve_paths(_build(cls, raw, ""), Path(base_dir).resolve())
    _check_weight_files(cfg)
    _check_round_trip(cfg)
    return cfg


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load an experiment YAML into a validated, frozen Config.

    Errors name the file (or the `--set`) and the dotted key:
    `params/x.yaml: cams.scales: must not be empty`, `--set cams.scales=[]: must not be empty`.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a parameter file (e.g. params/default.yaml)")
    if not path.is_file():
        if path.exists():  # /dev/null, a FIFO, <(...): relative paths in it would mean nothing
            raise ConfigError(f"{path}: not a regular file (a FIFO or device); save the parameters to a file")
        raise ConfigError(f"{path}: parameter file not found")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {size / 1e6:.1f} MB; a parameter file is at most {MAX_FILE_BYTES // 1000} kB "
                              "(params/*.yaml are a few kB)")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a parameter file is UTF-8 YAML)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the parameter file ({e.strerror or e})") from None
    try:
        raw = parse_yaml(text, str(path))
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    if raw is None:
        raise ConfigError(f"{path}: the parameter file is empty (start from params/default.yaml)")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(raw, overrides, base_dir=path.parent)
    except ConfigError as e:
        dotted = next((k for k in overrides or {} if e.key is not None and
                       (e.key == k or e.key.startswith((f"{k}.", f"{k}[")))), None)
        if dotted is None:
            raise ConfigError(f"{path}: {e}", e.key) from None
        msg = str(e)[len(dotted) + 2:] if str(e).startswith(f"{dotted}: ") else str(e)
        raise ConfigError(f"--set {dotted}={flow_yaml((overrides or {})[dotted])}: {msg}", e.key) from None
