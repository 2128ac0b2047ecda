"""Typed params: defaults, validation with file + dotted key, overrides."""

from pathlib import Path

import pytest
import yaml

from wsss_core.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    section_hash,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["default", "ci", "msrc"])
def test_shipped_params_load(name):
    cfg = load_config(REPO / "params" / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.name == {"default": "demo"}.get(name, name)


def test_msrc_params_point_at_the_shared_dataset():
    cfg = load_config(REPO / "params" / "msrc.yaml")
    assert cfg.data.format == "voc"
    assert Path(cfg.data.root).is_absolute()
    assert Path(cfg.data.root).parts[-3:] == ("shared", "data", "msrc-voc")
    assert cfg.cams.method == "gradcam++" and cfg.cams.scales == (1.25, 1.5)


def test_defaults_match_the_reference_settings():
    cfg = config_from_dict({})
    assert cfg.crf.gt_prob == 0.7 and cfg.crf.iterations == 10
    assert (cfg.crf.gauss_sxy, cfg.crf.gauss_compat) == (3.0, 3.0)
    assert (cfg.crf.bilateral_sxy, cfg.crf.bilateral_srgb, cfg.crf.bilateral_compat) == (50.0, 5.0, 10.0)
    assert (cfg.crf.conf_fg_thres, cfg.crf.conf_bg_thres) == (0.30, 0.05)
    assert cfg.label_filter.threshold == 0.8
    assert cfg.classifier.backbone_lr_mult == 0.1


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_misspelt_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "cams:\n  scalez: [1.0]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "cams.scalez" in msg and "unknown key" in msg


def test_nested_misspelt_key(tmp_path):
    p = write(tmp_path, "data:\n  synthetic:\n    n_trian: 3\n")
    with pytest.raises(ConfigError, match=r"data\.synthetic\.n_trian: unknown key"):
        load_config(p)


@pytest.mark.parametrize(
    "text, key, what",
    [
        ("classifier:\n  lr: -0.1\n", "classifier.lr", "must be > 0"),
        ("cams:\n  scales: []\n", "cams.scales", "must not be empty"),
        ("cams:\n  scales: [1.0, -2]\n", "cams.scales", "item 1"),
        ("crf:\n  conf_fg_thres: 1.5\n", "crf.conf_fg_thres", "[0, 1]"),
        ("label_filter:\n  threshold: -0.1\n", "label_filter.threshold", "[0, 1]"),
        ("classifier:\n  epochs: 2.5\n", "classifier.epochs", "integer"),
        ("classifier:\n  epochs: true\n", "classifier.epochs", "integer"),
        ("cams:\n  flip: 'yes'\n", "cams.flip", "true or false"),
        ("cams:\n  method: gradcam+++\n", "cams.method", "one of"),
        ("classifier:\n  output_stride: 32\n", "classifier.output_stride", "8 or 16"),
        ("data:\n  format: voc\n", "data.root", "required"),
        ("classifier:\n  augment:\n    scale_range: [1.3, 0.7]\n", "classifier.augment.scale_range", "low <= high"),
        ("cams: 3\n", "cams", "mapping"),
        ("crf:\n  conf_fg_thres: 0.1\n  conf_bg_thres: 0.2\n", "crf.conf_bg_thres", "<="),
    ],
)
def test_impossible_values_fail_with_key_path(tmp_path, text, key, what):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {key}"), msg
    assert what in msg


def test_int_is_accepted_for_float_and_stored_as_float():
    cfg = config_from_dict({"classifier": {"lr": 1}})
    assert cfg.classifier.lr == 1.0 and isinstance(cfg.classifier.lr, float)


def test_overrides_go_through_the_same_validation():
    cfg = config_from_dict({}, {"cams.scales": [1.0, 0.5], "crf.iterations": 4})
    assert cfg.cams.scales == (1.0, 0.5) and cfg.crf.iterations == 4
    with pytest.raises(ConfigError, match=r"cams\.scales: must not be empty"):
        config_from_dict({}, {"cams.scales": []})
    with pytest.raises(ConfigError, match=r"cams\.sclaes: unknown key"):
        config_from_dict({}, {"cams.sclaes": [1.0]})
    with pytest.raises(ConfigError, match=r"cams\.scales\.x: unknown key"):
        config_from_dict({}, {"cams.scales.x": 1})


@pytest.mark.parametrize("old,new", [("upper_bound", "bound"), ("upper_bound_epochs", "bound_epochs")])
def test_a_renamed_key_says_its_new_name_in_the_file_and_in_overrides(old, new, tmp_path):
    """A config written before the bound had one name gets the new key, not a list of known keys."""
    p = write(tmp_path, f"segmentation:\n  {old}: true\n")
    with pytest.raises(ConfigError, match=rf"segmentation\.{old}: renamed segmentation\.{new}$"):
        load_config(p)
    with pytest.raises(ConfigError, match=rf"^segmentation\.{old}: renamed segmentation\.{new}$"):
        config_from_dict({}, {f"segmentation.{old}": 1})
    assert config_from_dict({}, {f"segmentation.{new}": 1 if new == "bound_epochs" else True}) is not None


def test_an_error_names_where_the_value_came_from(tmp_path):
    """A bad value from --set names the --set; one from the file names the file."""
    p = write(tmp_path, "classifier:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: classifier.batch_size: must be in [1, 65536], got 0"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "name: x\n"), {"classifier.batch_size": 0})
    assert str(e.value) == "--set classifier.batch_size=0: must be in [1, 65536], got 0"
    with pytest.raises(ConfigError) as e:  # an item of a list names the item
        load_config(write(tmp_path, "name: x\n"), {"cams.scales": [1.0, -0.5]})
    assert str(e.value) == "--set cams.scales=[1.0, -0.5]: item 1: must be > 0 and <= 8.0, got -0.5"
    with pytest.raises(ConfigError) as e:  # a cross-check names the key it blames
        load_config(write(tmp_path, "name: x\n"), {"crf.conf_bg_thres": 0.5})
    assert str(e.value).startswith("--set crf.conf_bg_thres=0.5: must be <= crf.conf_fg_thres")


def test_configs_are_frozen():
    cfg = config_from_dict({})
    with pytest.raises(Exception):
        cfg.cams.flip = False  # type: ignore[misc]


def test_relative_root_resolves_against_the_yaml_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "x.yaml"
    p.write_text("data:\n  format: voc\n  root: ../data\n")
    assert load_config(p).data.root == (tmp_path / "data").resolve()


def test_dump_round_trips(tmp_path):
    cfg = load_config(REPO / "params" / "msrc.yaml", {"cams.scales": [1.0, 2.0]})
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    assert config_to_dict(again) == yaml.safe_load(p.read_text())


def test_section_hash_tracks_only_its_sections():
    a = config_from_dict({})
    b = config_from_dict({}, {"cams.flip": False})
    assert section_hash(a, ["crf"]) == section_hash(b, ["crf"])
    assert section_hash(a, ["cams"]) != section_hash(b, ["cams"])


@pytest.mark.parametrize("section, key, neutral, other, kind", [
    ("cams", "storage", "float32", "uint8", "output"), ("boundary", "stem_input", False, True, "output"),
    ("pseudo_masks", "bg_power", None, 4.0, "output"),
    ("pseudo_masks", "sweep_bg_powers", (2.0, 3.0, 4.0, 5.0, 6.0, 8.0), (4.0,), "eval"),
    ("predict", "crf_gt_prob", None, 0.97, "output"), ("classifier", "recam_weight", 0.0, 0.7, "output"),
    ("classifier", "recam_epochs", 4, 2, "output"), ("classifier", "recam_lr", 1e-3, 1e-4, "output"),
    ("cams", "head", "classifier", "recam", "output"), ("segmentation", "val_every", 1, 3, "output"),
    ("segmentation", "bound_epochs", None, 25, "output"),
    ("segmentation", "ignore_disagreement", False, True, "output"),
    ("predict", "precision", "float32", "bfloat16", "output")])
def test_a_parameter_at_its_neutral_value_leaves_the_fingerprint_as_before_it_existed(section, key, neutral, other,
                                                                                      kind):
    """cams.storage, boundary.stem_input, pseudo_masks.bg_power (and the eval-only sweep_bg_powers),
    predict.crf_gt_prob, the classifier's ReCAM keys and cams.head came after
    runs were made: at their neutral values (what the code before them computed) the section's fingerprint is
    the one of the section without the key (nor the section's other later keys, at their neutral values), so
    finished runs stay usable; another value changes it."""
    from dataclasses import asdict, fields

    from wsss_core.config import section_values

    def plain(v):
        return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v

    a = config_from_dict({}, {f"{section}.{key}": neutral})
    values = asdict(getattr(a, section))
    later = {f.name for f in fields(getattr(a, section))
             if "neutral" in f.metadata and plain(values[f.name]) == plain(f.metadata["neutral"])}
    before = {f.name: plain(values[f.name]) for f in fields(getattr(a, section))
              if f.name != key and f.name not in later and f.metadata.get("kind", "output") == kind}
    assert section_values(a, [section], kind) == {section: before}
    b = config_from_dict({}, {f"{section}.{key}": other})
    assert section_values(b, [section], kind)[section][key] == plain(other)
    assert section_hash(a, [section], kind) != section_hash(b, [section], kind)


def test_a_change_from_a_neutral_value_is_named_with_it(tmp_path):
    """A run made at the neutral value, asked for another: the reason names both values, not None."""
    from wsss_core.stages import open_run
    from wsss_core.store import StageResult

    def reason(made_with, asked):
        root = tmp_path / made_with
        run = open_run(root, config_from_dict({}, {"cams.storage": made_with}))
        for name in ("data", "classifier", "label_filter", "cams"):  # manifests only: what staleness reads
            run.begin(name)
            run.finish(name, StageResult(metrics={}), "2026-12-03T00:00:00")
        return open_run(root, config_from_dict({}, {"cams.storage": asked})).why_not_done("cams")

    assert reason("float32", "uint8") == "02_cams was made with other parameters (cams.storage: 'float32' -> 'uint8')"
    assert reason("uint8", "float32") == "02_cams was made with other parameters (cams.storage: 'uint8' -> 'float32')"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "cams: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_list_parameters_are_bounded_however_they_arrive(tmp_path):
    """10,000 values pass; one more is refused from a mapping (config_from_dict), from a file (at the line of
    the 10,001st value, before the rest is read) and from a nested list of lists; a file over 256 kB is refused
    before it is parsed."""
    ok = config_from_dict({"cams": {"bg_thresholds": [0.25] * 10_000}})
    assert len(ok.cams.bg_thresholds) == 10_000
    with pytest.raises(ConfigError, match=r"^cams\.bg_thresholds: at most 10000 values, got 10001$"):
        config_from_dict({"cams": {"bg_thresholds": [0.25] * 10_001}})
    p = write(tmp_path, "cams:\n  bg_thresholds: [\n" + "0.25,\n" * 10_001 + "0.25]\n")
    with pytest.raises(ConfigError, match=r": line 10003: a list of more than 10000 values"):
        load_config(p)
    p = write(tmp_path, "x: [[" + "1, " * 10_000 + "1], [1]]\n")
    with pytest.raises(ConfigError, match=r": line 1: a list of more than 10000 values"):
        load_config(p)
    p = write(tmp_path, "name: demo\n" + "# padding\n" * 25_600)  # 256,011 bytes of comments
    with pytest.raises(ConfigError, match=r": 0\.3 MB; a parameter file is at most 256 kB"):
        load_config(p)
    p.write_text("name: demo\n" + "# padding\n" * 25_000)  # 250,011 bytes: read
    assert load_config(p).name == "demo"


def test_unknown_backbone_and_missing_weights_fail_at_load(tmp_path):
    p = write(tmp_path, "classifier:\n  backbone: resnet5O\n")
    with pytest.raises(ConfigError, match=r"classifier\.backbone: must be one of"):
        load_config(p)
    p = write(tmp_path, "classifier:\n  weights: weights/missing.pt\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "classifier.weights: weights file not found" in str(e.value)
    assert str(tmp_path / "weights" / "missing.pt") in str(e.value)
    (tmp_path / "w.pt").write_bytes(b"x")
    p = write(tmp_path, "classifier:\n  weights: w.pt\n")
    assert load_config(p).classifier.weights == tmp_path / "w.pt"
