"""Loading experiment parameters: YAML -> validated, frozen `Config`.

One YAML file per experiment, one section per stage. Unknown keys, duplicate
keys, wrong types and impossible values fail at load time with the file and
the dotted key path, and so do dotted overrides (`--set`), which go through
the same validation. Numbers in scientific notation (`1e-4`) are numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .sections import Config, ConfigError


# --------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"list of {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError(key)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
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
        for a in args:
            if a is type(None):
                continue
            with contextlib.suppress(ConfigError):
                return _coerce(value, a, key)
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: must have exactly {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: must be a finite number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported parameter type {tp!r} at {key}")  # programming error


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (known keys in "
            f"{prefix or 'the top level'}: {', '.join(sorted(fields))})", f"{where}{unknown[0]}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            value = raw[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping) and \
                    f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                # keys the YAML leaves out keep this section's own defaults
                value = {**_plain(f.default_factory()), **value}  # type: ignore[misc]
            try:
                v = _coerce(value, hints[name], key)
            except ConfigError as e:
                raise ConfigError(str(e), e.key or key) from None
        else:
            v = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        check = f.metadata.get("check")
        if check is not None:
            msg = check(v)
            if msg:
                raise ConfigError(f"{key}: {msg}", key)
        values[name] = v
    return cls(**values)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a number (YAML 1.2, what users mean; YAML
    1.1 wants `1.0e-4`)."""


def _check_duplicate_keys(node: yaml.Node, prefix: str = "") -> None:
    """Refuse a key given twice in one mapping (PyYAML silently keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key}: duplicate key (lines {seen[key]} and {line})")
            seen[key] = line
            _check_duplicate_keys(value_node, key)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{prefix}[{i}]")


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, what: str) -> Any:
    """YAML text -> Python data with `_Loader`; ConfigError naming `what` on bad syntax."""
    try:
        node = yaml.compose(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        if node is not None:
            _check_duplicate_keys(node)
        return yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"{what}: not valid YAML: {detail}") from None


def parse_override_value(text: str, key: str = "value") -> Any:
    """Parse a command-line override value (`1e-3`, `[1.0, 0.5]`, `true`) as YAML."""
    return parse_yaml(text, f"--set {key}={text}")


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`cams.scales`) in a copy of the raw mapping."""
    out = json.loads(json.dumps(raw)) if raw else {}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"override {dotted!r}: empty key component")
        cls: Any = Config
        node = out
        for i, part in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
            if part not in names:
                path = ".".join(parts[: i + 1])
                known = f" (known keys in {'.'.join(parts[:i])}: {', '.join(sorted(names))})" if i and names else ""
                raise ConfigError(f"{path}: unknown key{known}", dotted)
            if i == len(parts) - 1:
                node[part] = list(value) if isinstance(value, tuple) else value
            else:
                cls = typing.get_type_hints(cls)[part]
                nxt = node.get(part)
                if nxt is None:
                    nxt = node[part] = {}
                elif not isinstance(nxt, dict):
                    raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section", dotted)
                node = nxt
    return out


_WEIGHTED = ("classifier", "boundary", "segmentation")  # sections with a `weights` field


def _absolute(value: str | None, base: Path) -> str | None:
    """A user path made absolute: ~ and $VARS expanded, relative to `base`."""
    if value is None:
        return None
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Make every path absolute, relative to the YAML file's folder (notebooks
    run in notebooks/, so a relative path must not depend on the working folder)."""
    data = cfg.data
    syn = data.synthetic
    sections = {s: getattr(cfg, s) for s in _WEIGHTED}
    weights = {s: dataclasses.replace(v, weights=v.weights if v.weights in ("imagenet", "random")
                                      else _absolute(v.weights, base)) for s, v in sections.items()}
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(data, root=_absolute(data.root, base),
                                 synthetic=dataclasses.replace(syn, cache_dir=_absolute(syn.cache_dir, base))),
        label_filter=dataclasses.replace(cfg.label_filter, trusted_list=_absolute(cfg.label_filter.trusted_list, base)),
        **weights,
    )


def _cross_checks(cfg: Config) -> None:
    for s in _WEIGHTED:
        w = getattr(cfg, s).weights
        if w not in ("imagenet", "random") and not Path(w).is_file():
            raise ConfigError(f"{s}.weights: weights file not found: {w} (or use 'imagenet' / 'random')",
                              f"{s}.weights")
    if cfg.boundary.weights == "random":
        raise ConfigError("boundary.weights: the boundary backbone is frozen, so it needs trained weights "
                          "('imagenet' or a state-dict file), not 'random'", "boundary.weights")
    if cfg.data.format in ("voc", "lid") and not cfg.data.root:
        raise ConfigError(f"data.root: required when data.format is {cfg.data.format!r}", "data.root")
    if cfg.crf.conf_bg_thres > cfg.crf.conf_fg_thres:
        raise ConfigError(
            "crf.conf_bg_thres: must be <= crf.conf_fg_thres "
            f"({cfg.crf.conf_bg_thres} > {cfg.crf.conf_fg_thres})", "crf.conf_bg_thres"
        )


def _check_round_trip(cfg: Config) -> None:
    """Every value must come back unchanged from the run's config.yaml and
    manifests (JSON): a string that UTF-8 cannot encode (from a command line
    in another encoding) would otherwise fail a stage after it started."""
    plain = config_to_dict(cfg)
    for key, value in _leaves(plain):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{key}: {value!r} is not valid text (UTF-8 cannot encode it)", key) from None
    if json.loads(json.dumps(plain, allow_nan=False)) != plain or parse_yaml(dump_config(cfg), "config") != plain:
        raise ConfigError("the parameters do not survive a round trip through JSON and YAML")


def _leaves(v: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(v, dict):
        return [leaf for k, x in v.items() for leaf in _leaves(x, f"{prefix}.{k}" if prefix else k)]
    if isinstance(v, list):
        return [leaf for i, x in enumerate(v) for leaf in _leaves(x, f"{prefix}[{i}]")]
    return [(prefix, v)]


def config_from_dict(
    raw: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
    base_dir: str | Path = ".",
) -> Config:
    """Build and validate a Config from a raw mapping (plus dotted overrides)."""
    raw = dict(raw or {})
    if overrides:
        raw = apply_overrides(raw, overrides)
    cfg = _build(Config, raw, "")
    cfg = _resolve_paths(cfg, Path(base_dir).resolve())
    _cross_checks(cfg)
    _check_round_trip(cfg)
    return cfg


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load an experiment YAML into a validated, frozen Config.

    Errors name the file and the dotted key: `params/x.yaml: cams.scales: must not be empty`.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a parameter file (e.g. params/default.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a parameter file is UTF-8 YAML)") from None
    except OSError as e:
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise ConfigError(f"{path}: cannot read the parameter file ({reason})") from None
    try:
        raw = parse_yaml(text, str(path))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    if raw is None:
        raise ConfigError(f"{path}: the parameter file is empty (start from params/default.yaml)")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(raw, overrides, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{_source(e, overrides) or path}: {_without_key(e, overrides)}", e.key) from None


def _override_of(key: str | None, overrides: Mapping[str, Any] | None) -> str | None:
    """The `--set` key whose value `key` lies in (None: the value came from the file)."""
    for dotted in overrides or {}:
        if key is not None and (key == dotted or key.startswith((f"{dotted}.", f"{dotted}["))):
            return dotted
    return None


def _source(e: ConfigError, overrides: Mapping[str, Any] | None) -> str | None:
    """`--set KEY=VALUE` when the faulty value came from an override."""
    dotted = _override_of(e.key, overrides)
    if dotted is None:
        return None
    value = yaml.safe_dump(_plain((overrides or {})[dotted]), default_flow_style=True, width=10**6)
    return f"--set {dotted}={value.strip().removesuffix('...').strip()}"


def _without_key(e: ConfigError, overrides: Mapping[str, Any] | None) -> str:
    """The message without its leading `key: ` when `--set key=...` already names it."""
    msg = str(e)
    dotted = _override_of(e.key, overrides)
    return msg[len(dotted) + 2:] if dotted and msg.startswith(f"{dotted}: ") else msg


# --------------------------------------------------------------------------- output
def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config (or one section) as plain YAML/JSON-able data."""
    return _plain(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def field_kind(cls: type, name: str) -> str:
    """"output" | "eval" | "runtime" of a field (see `sections`)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("kind", "output")


def values_of_kind(v: Any, kind: str) -> Any:
    """Plain values of the fields of one kind, recursively (sub-sections kept
    when they hold any such field)."""
    if not dataclasses.is_dataclass(v):
        return _plain(v)
    out = {}
    for f in dataclasses.fields(v):
        value = getattr(v, f.name)
        if dataclasses.is_dataclass(value):
            sub = values_of_kind(value, kind)
            if sub:
                out[f.name] = sub
        elif f.metadata.get("kind", "output") == kind:
            out[f.name] = _plain(value)
    return out


def section_values(cfg: Config, sections: tuple[str, ...] | list[str], kind: str = "output",
                   ignore: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """{section: values of its `kind` fields} for top-level sections or fields,
    without the dotted fields in `ignore` (fields of a section a stage does not use)."""
    out = {}
    for s in sections:
        value = getattr(cfg, s)
        if dataclasses.is_dataclass(value):
            out[s] = values_of_kind(value, kind)
        elif field_kind(Config, s) == kind:
            out[s] = _plain(value)
    for dotted in ignore:
        *parents, last = dotted.split(".")
        node: Any = out
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def section_hash(cfg: Config, sections: tuple[str, ...] | list[str], kind: str = "output",
                 ignore: tuple[str, ...] | list[str] = ()) -> str:
    """Stable hash of the `kind` fields of the named sections (what a stage depends on)."""
    blob = json.dumps(section_values(cfg, sections, kind, ignore), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_root(cfg: Config) -> Path:
    """Folder for generated data (synthetic datasets)."""
    if cfg.data.synthetic.cache_dir:
        return Path(cfg.data.synthetic.cache_dir)
    env = os.environ.get("WSSS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wsss"
