"""Typed experiment parameters.

- `fields`: what a parameter is (`param`, checks, kinds, `ConfigError`);
- `sections`: the built-in sections, and `config_class()`, the run's Config
  composed from the sections the stages declare;
- `load`: YAML -> validated, frozen Config (`load_config`, errors `file: key: what`);
- `parsing`: YAML text -> data (safe, `1e-4` a number, duplicate keys refused);
- `values`: a config as plain data, and the hashes stage fingerprints use.
"""

from .fields import KINDS, ConfigError, param, subsection
from .load import apply_overrides, config_from_dict, load_config
from .parsing import parse_override_value, parse_yaml
from .sections import (
    SECTIONS,
    AugmentConfig,
    BoundaryConfig,
    CamsConfig,
    ClassifierConfig,
    Config,
    CrfConfig,
    DataConfig,
    LabelFilterConfig,
    LidConfig,
    PredictConfig,
    PseudoMasksConfig,
    SegmentationConfig,
    SyntheticConfig,
    Weights,
    add_section,
    config_class,
    kept_sections,
    ordered_sections,
)
from .values import (
    cache_root,
    config_to_dict,
    dump_config,
    field_kind,
    flow_yaml,
    kind_of,
    plain,
    section_hash,
    seed_keys,
    section_values,
    values_of_kind,
    with_neutral,
)

__all__ = [
    "KINDS", "SECTIONS", "AugmentConfig", "BoundaryConfig", "CamsConfig", "ClassifierConfig", "Config", "ConfigError",
    "CrfConfig", "DataConfig", "LabelFilterConfig", "LidConfig", "PredictConfig", "PseudoMasksConfig",
    "SegmentationConfig", "SyntheticConfig", "Weights", "add_section", "apply_overrides", "kept_sections", "ordered_sections", "cache_root",
    "config_class", "config_from_dict", "config_to_dict", "dump_config", "field_kind", "flow_yaml", "kind_of", "load_config", "param",
    "parse_override_value", "parse_yaml", "plain", "section_hash", "seed_keys", "section_values", "subsection", "values_of_kind",
    "with_neutral",
]
