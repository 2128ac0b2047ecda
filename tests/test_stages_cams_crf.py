"""CAM and CRF stages on a CI-sized run: files, formats, metrics, skipping."""

import numpy as np
from PIL import Image

from wsss_core import stages
from wsss_core.artifacts import read_kept_ids
from wsss_core.cam import CamResult
from wsss_core.data import open_dataset


def test_cams_stage_writes_one_npz_per_kept_image(ci_run):
    cfg, run = ci_run
    kept = read_kept_ids(run)
    folder = run.path("cams") / "cams"
    assert sorted(p.stem for p in folder.glob("*.npz")) == sorted(kept)
    ds = open_dataset(cfg.data, validate=False)
    images = ds.labelled(cfg.data.train_split)
    for sid in kept[:5]:
        z = np.load(folder / f"{sid}.npz")
        assert z["cam"].dtype == np.float16 and z["high_res"].dtype == np.float16
        h, w = images.image(images.ids.index(sid)).shape[:2]
        assert z["high_res"].shape[1:] == (h, w) and z["cam"].shape[1:] == ((h + 3) // 4, (w + 3) // 4)
        labels = images.labels[images.ids.index(sid)]
        assert z["keys"].tolist() == [k for k in range(1, ds.num_classes) if labels[k - 1] > 0.5]
        res = CamResult.from_npz(folder / f"{sid}.npz")
        peaks = res.high_res.reshape(len(res.keys), -1).max(1)
        # per-class normalisation: each map peaks at 1, unless ReLU left it all zero
        assert all(abs(p - 1.0) < 2e-3 or p == 0.0 for p in peaks), peaks


def test_cams_stage_reports_a_threshold_sweep(ci_run):
    cfg, run = ci_run
    m = run.manifest("cams")["metrics"]
    q = m["quality"]
    assert q["thresholds"] == list(cfg.cams.bg_thresholds)
    assert len(q["miou"]) == len(q["thresholds"]) and max(q["miou"]) == m["miou_best"]
    assert q["miou"][q["thresholds"].index(m["best_threshold"])] == m["miou_best"]
    assert 0.0 < m["miou_best"] <= 1.0


def test_crf_stage_writes_confident_label_pngs(ci_run):
    cfg, run = ci_run
    kept = read_kept_ids(run)
    folder = run.path("crf") / "ir_labels"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(kept)
    for sid in kept[:5]:
        lab = np.array(Image.open(folder / f"{sid}.png"))
        keys = np.load(run.path("cams") / "cams" / f"{sid}.npz")["keys"]
        assert set(np.unique(lab)) <= {0, 255, *keys.tolist()}
    q = run.manifest("crf")["metrics"]["quality"]
    assert 0.0 <= q["coverage"] <= 1.0 and 0.0 <= q["precision"] <= 1.0
    assert q["images"] == len(kept)


def test_finished_stages_are_skipped(ci_run):
    cfg, run = ci_run
    assert stages.run_stage("cams", cfg, run).skipped
    assert stages.run_stage("crf", cfg, run).skipped


def test_cams_at_a_chosen_layer_and_a_bad_layer(tmp_path):
    import pytest

    from wsss_core.config import ConfigError, load_config
    from wsss_core.models import build_classifier

    from conftest import REPO

    layers = build_classifier(load_config(REPO / "params" / "ci.yaml").classifier, 2).backbone.layer_names
    cfg = load_config(REPO / "params" / "ci.yaml", {"cams.layer": "no.such.layer", "label_filter.enabled": False})
    run = stages.open_run(tmp_path / "run", cfg)
    for name in ("data", "classifier", "label_filter"):
        stages.run_stage(name, cfg, run)
    with pytest.raises(ConfigError, match=r"cams\.layer: 'no\.such\.layer' is not a layer"):
        stages.run_stage("cams", cfg, run)
    assert not list((run.path("cams") / "cams").glob("*.npz"))

    cfg = load_config(REPO / "params" / "ci.yaml", {"cams.layer": layers[-3], "label_filter.enabled": False})
    run = stages.open_run(tmp_path / "run", cfg)
    m = stages.run_stage("cams", cfg, run).metrics
    assert len(list((run.path("cams") / "cams").glob("*.npz"))) == m["images"] > 0
