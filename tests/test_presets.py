"""The VOC 2012 and LID 2020 presets load, carry the reference settings, and
run the data stage on a tiny dataset in their layout."""

import pytest

from wsss_core import cli, stages
from wsss_core.config import load_config

from conftest import REPO
from fixtures import TRAIN, VAL, make_lid, make_voc

PRESETS = {"voc2012": "VOC2012_ROOT", "lid2020": "LID2020_ROOT"}


def test_voc2012_has_irnet_settings():
    cfg = load_config(REPO / "params" / "voc2012.yaml")
    assert cfg.classifier.backbone == cfg.boundary.backbone == cfg.segmentation.backbone == "resnet50"
    assert cfg.cams.scales == (1.0, 0.5, 1.5, 2.0) and cfg.cams.flip
    assert (cfg.crf.conf_fg_thres, cfg.crf.conf_bg_thres) == (0.30, 0.05)
    p = cfg.pseudo_masks
    assert (p.radius, p.beta, p.exp_times, p.sem_seg_bg_thres) == (5, 10.0, 8, 0.25)
    assert cfg.boundary.radius == 10


def test_lid2020_has_the_reference_settings():
    cfg = load_config(REPO / "params" / "lid2020.yaml")
    assert cfg.data.format == "lid" and cfg.classifier.backbone == "vgg16_gap" and cfg.cams.method == "gradcam"
    assert cfg.classifier.exclude_classes == ("person",)
    assert cfg.label_filter.enabled and cfg.label_filter.class_name == "person" and cfg.label_filter.threshold == 0.8
    s = cfg.segmentation
    assert (s.backbone, s.output_stride, s.atrous_rates) == ("resnet50", 8, (12, 24, 36))
    assert cfg.predict.tta_scales == (0.5, 1.0, 2.0) and cfg.predict.tta_flip and cfg.predict.layout == "lid"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_runs_the_data_stage_on_its_layout(preset, tmp_path, monkeypatch, capsys):
    if preset == "voc2012":
        root = make_voc(tmp_path / "voc")
        n_classes, n_train = 3, 4
    else:
        names = {"1": "accordion", "2": "airplane", "3": "person"}
        root = make_lid(tmp_path / "lid", names=names)
        (root / "trusted_train.txt").write_text("n02691156_1\nn02219486_5\n")
        n_classes, n_train = 4, len(TRAIN)
    monkeypatch.setenv(PRESETS[preset], str(root))
    config = REPO / "params" / f"{preset}.yaml"
    cfg = load_config(config)
    assert cfg.data.root == root
    assert cli.main(["validate", "--config", str(config)]) == 0  # every stage's checks pass on the fixture
    run = stages.open_run(tmp_path / "run", cfg)
    m = stages.run_stage("data", cfg, run).metrics
    assert m["num_classes"] == n_classes and m["train_images"] == n_train
    assert m["val_images"] == (len(VAL) if preset == "lid2020" else 3)


def test_an_unset_root_names_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("LID2020_ROOT", raising=False)
    assert cli.main(["validate", "--config", str(REPO / "params" / "lid2020.yaml")]) == 2
    assert capsys.readouterr().err == (f"wsss: error: data.root: $LID2020_ROOT is not set ({REPO / 'params'}/"
                                       "${LID2020_ROOT}); export LID2020_ROOT=<the dataset folder> or give the folder "
                                       "in the parameter file\n")
