"""Typed experiment parameters: sections (`sections`) and loading (`load`).

    load_config(path, overrides) -> Config   (errors: `file: dotted.key: what`)
    section_hash(cfg, sections, kind)        (what a stage's fingerprint hashes)
"""

from .load import (
    apply_overrides,
    cache_root,
    config_from_dict,
    config_to_dict,
    dump_config,
    field_kind,
    load_config,
    parse_override_value,
    parse_yaml,
    section_hash,
    section_values,
    values_of_kind,
)
from .sections import (
    KINDS,
    AugmentConfig,
    BoundaryConfig,
    ClassifierConfig,
    Config,
    ConfigError,
    CrfConfig,
    CamsConfig,
    DataConfig,
    LabelFilterConfig,
    LidConfig,
    PredictConfig,
    PseudoMasksConfig,
    SegmentationConfig,
    SyntheticConfig,
)

__all__ = [
    "KINDS", "AugmentConfig", "BoundaryConfig", "CamsConfig", "ClassifierConfig", "PredictConfig",
    "PseudoMasksConfig", "SegmentationConfig", "Config", "ConfigError", "CrfConfig",
    "DataConfig", "LabelFilterConfig", "LidConfig", "SyntheticConfig", "apply_overrides", "cache_root",
    "config_from_dict", "config_to_dict", "dump_config", "field_kind", "load_config", "parse_override_value",
    "parse_yaml", "section_hash", "section_values", "values_of_kind",
]
