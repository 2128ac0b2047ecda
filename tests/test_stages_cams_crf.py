"""CAM and CRF stages on a CI-sized run: files, formats, metrics, skipping."""

import numpy as np
import pytest
from PIL import Image

from wsss_core import stages
from wsss_core.artifacts import read_kept_ids
from wsss_core.cam_maps import CamResult
from wsss_core.data import open_dataset


def test_cams_stage_writes_one_npz_per_kept_image(ci_run):
    cfg, run = ci_run
    kept = read_kept_ids(run)
    folder = run.make_folder("cams") / "cams"
    assert sorted(p.stem for p in folder.glob("*.npz")) == sorted(kept)
    ds = open_dataset(cfg.data, validate=False)
    images = ds.labelled(cfg.data.train_split)
    for sid in kept[:5]:
        z = np.load(folder / f"{sid}.npz")
        h, w = images.image(sid).shape[:2]
        assert z["image_size"].tolist() == [h, w]
        # one map per scale at the classifier's feature resolution (output stride 16 of the scaled image)
        scales = [n for n in z.files if n.startswith("scale")]
        assert len(scales) == len(cfg.cams.scales)
        for name, s in zip(sorted(scales), cfg.cams.scales):
            assert z[name].dtype == np.float32
            assert z[name].shape[1:] == tuple(-(-round(v * s) // cfg.classifier.output_stride) for v in (h, w))
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
    folder = run.make_folder("crf") / "confident_labels"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(kept)
    for sid in kept[:5]:
        lab = np.array(Image.open(folder / f"{sid}.png"))
        keys = np.load(run.make_folder("cams") / "cams" / f"{sid}.npz")["keys"]
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
    assert not list((run.make_folder("cams") / "cams").glob("*.npz"))

    cfg = load_config(REPO / "params" / "ci.yaml", {"cams.layer": layers[-3], "label_filter.enabled": False})
    run = stages.open_run(tmp_path / "run", cfg)
    m = stages.run_stage("cams", cfg, run).metrics
    assert len(list((run.make_folder("cams") / "cams").glob("*.npz"))) == m["images"] > 0


def test_threshold_sweep_against_a_hand_computed_case():
    from wsss_core.evaluate import cam_threshold_sweep

    classes = ("background", "cat", "dog")
    cams = np.zeros((2, 2, 4), np.float32)
    cams[0] = [[0.9, 0.5, 0.0, 0.0], [0.4, 0.2, 0.0, 0.0]]  # class 1 (cat)
    cams[1] = [[0.0, 0.0, 0.7, 0.35], [0.0, 0.0, 0.8, 0.1]]  # class 2 (dog)
    gt = np.array([[1, 1, 2, 2], [1, 0, 2, 0]], np.uint8)
    q = cam_threshold_sweep([(cams, np.array([1, 2]), gt)], [0.3, 0.6], classes)
    # t = 0.3: pred [[1,1,2,2],[1,0,2,0]] == gt: every IoU 1
    # t = 0.6: pred [[1,0,2,0],[0,0,2,0]]: bg 2/(2+3) = 0.4, cat 1/3, dog 2/3
    assert q["miou"][0] == pytest.approx(1.0)
    assert q["miou"][1] == pytest.approx((0.4 + 1 / 3 + 2 / 3) / 3)
    assert q["best_threshold"] == 0.3 and q["best"]["miou"] == pytest.approx(1.0)


def test_crf_sweep_at_the_run_thresholds_equals_the_stage(ci_run):
    from wsss_core.stages.crf import crf_threshold_sweep

    cfg, run = ci_run
    ids = read_kept_ids(run)
    c = cfg.crf
    point = crf_threshold_sweep(cfg, run, ids, [(c.conf_fg_thres, c.conf_bg_thres), (0.9, 0.01)])
    q = run.manifest("crf")["metrics"]["quality"]
    assert point[0]["precision"] == pytest.approx(q["precision"], abs=1e-12)
    assert point[0]["coverage"] == pytest.approx(q["coverage"], abs=1e-12)
    assert point[1]["coverage"] < point[0]["coverage"]  # a wider unconfident band covers less


@pytest.mark.usefixtures("grad_cam_peer")
def test_stored_cams_of_the_trained_classifier_equal_the_peer(ci_run, tmp_path):
    """Through the stage: the CAMs it stores for the ci classifier equal
    pytorch-grad-cam's on the normalised image (single scale, no flip)."""
    import shutil

    import torch
    import torch.nn.functional as F
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from wsss_core.artifacts import CAMS, model_path
    from wsss_core.config import load_config
    from wsss_core.multilabel import load_classifier

    from conftest import REPO

    _, first = ci_run
    shutil.copytree(first.root, tmp_path / "run")
    cfg = load_config(REPO / "params" / "ci.yaml", {"cams.scales": [1.0], "cams.flip": False})
    run = stages.open_run(tmp_path / "run", cfg)
    stages.run_stage("cams", cfg, run)
    trained = load_classifier(model_path(run, "classifier"))
    mean, std = trained.meta["normalization"]
    images = stages.dataset(cfg).labelled("train")
    checked = 0
    for sid in read_kept_ids(run):
        stored = CAMS.read(run, sid)
        if not len(stored.keys):
            continue
        image = images.image(sid)
        x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
            / torch.tensor(std)[:, None, None]
        for j, k in enumerate(stored.keys):
            target = [ClassifierOutputTarget(trained.class_ids.index(int(k)))]
            with GradCAM(model=trained.model, target_layers=[trained.model.cam_layer]) as cam:
                cam(input_tensor=x[None], targets=target)
                acts = cam.activations_and_grads.activations[0].numpy()
                grads = cam.activations_and_grads.gradients[0].numpy()
                raw = np.maximum(cam.get_cam_image(x[None], trained.model.cam_layer, target, acts, grads), 0)
            cells = raw.shape[-2] * raw.shape[-1]  # the stage sums scales in plain-CAM units (x h w)
            up = F.interpolate(torch.from_numpy(raw * cells)[None].float(), size=image.shape[:2], mode="bilinear",
                               align_corners=False)[0, 0].numpy()
            expected = up / (up.max() + 1e-5)
            assert np.abs(stored.high_res[j] - expected).max() < 1e-4, (sid, int(k))  # float32 maps on disk
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_cams_stored_as_uint8_are_the_float32_cams_rounded(ci_run, tmp_path):
    """`cams.storage: uint8`: the stage writes 8-bit codes, and every map it gives back is the
    float32 run's map (same classifier) within half a step of its class's range."""
    import shutil

    from wsss_core.artifacts import CAMS
    from wsss_core.config import load_config

    from conftest import REPO

    _, first = ci_run
    shutil.copytree(first.root, tmp_path / "run")
    cfg = load_config(REPO / "params" / "ci.yaml", {"cams.storage": "uint8"})
    run = stages.open_run(tmp_path / "run", cfg)
    stages.run_stage("cams", cfg, run)
    checked = 0
    for sid in read_kept_ids(run):
        small, full = CAMS.read(run, sid), CAMS.read(first, sid)
        assert small.storage == "uint8" and full.storage == "float32"
        with np.load(CAMS.path(run, sid)) as z:  # ci's maps are a few cells: the npz headers outweigh them
            assert {z[f"scale{i}"].dtype for i in range(len(cfg.cams.scales))} == {np.dtype(np.uint8)}
        for q, m in zip(small.scale_maps, full.scale_maps):
            step = (m.max((1, 2)) - m.min((1, 2))) / 255 if m.size else np.zeros(0)
            assert (np.abs(q - m).max((1, 2), initial=0) <= step / 2 * (1 + 1e-4) + 1e-7).all()
        checked += len(small.keys) > 0
    assert checked >= 5
