"""YAML text -> Python data: safe loading, `1e-4` as a number, duplicate keys refused,
sizes bounded (a parameter file of at most `MAX_FILE_BYTES`, lists of at most
`MAX_LIST_VALUES`), so validation stays quick on any input."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .fields import ConfigError

MAX_FILE_BYTES = 256_000  # params/*.yaml are a few kB; parsing 256 kB takes seconds
MAX_LIST_VALUES = 10_000  # a list parameter's values (200 class names, a threshold grid)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a number (YAML 1.2, what users mean; YAML
    1.1 wants `1.0e-4`)."""


_SCIENTIFIC = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _SCIENTIFIC, list("-+0123456789"))


class Dumper(yaml.SafeDumper):
    """SafeDumper that quotes what `_Loader` would read as a number (the string "1e5")."""


Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _SCIENTIFIC, list("-+0123456789"))


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


def parse_yaml(text: str, what: str) -> Any:
    """YAML text -> Python data with `_Loader`; ConfigError naming `what` on bad syntax."""
    try:
        lists: list[int | None] = []  # per open collection: values so far (a list) or None (a mapping)
        for event in yaml.parse(text, Loader=_Loader):  # noqa: S506
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                raise ConfigError(f"{what}: line {mark.line + 1}: anchors and aliases (&name, *name) are not "
                                  "supported in parameter files; write the values out")
            if isinstance(event, yaml.NodeEvent) and lists and lists[-1] is not None:
                lists[-1] += 1
                if lists[-1] > MAX_LIST_VALUES:
                    raise ConfigError(f"{what}: line {event.start_mark.line + 1}: a list of more than "
                                      f"{MAX_LIST_VALUES} values; parameter lists hold at most {MAX_LIST_VALUES}")
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                lists.append(0 if isinstance(event, yaml.SequenceStartEvent) else None)
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                lists.pop()
        node = yaml.compose(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        if node is not None:
            _check_duplicate_keys(node)
        return yaml.load(text, Loader=_Loader)  # noqa: S506
    except RecursionError:
        raise ConfigError(f"{what}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML: {' '.join(str(e).split())}") from None


def parse_override_value(text: str, key: str = "value", flag: str = "--set") -> Any:
    """Parse a command-line override value (`1e-3`, `[1.0, 0.5]`, `true`) as YAML; errors name
    `flag key=text` (the option the user typed)."""
    shown = text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"
    return parse_yaml(text, f"{flag} {key}={shown}")
