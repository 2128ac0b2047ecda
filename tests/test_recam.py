"""ReCAM (Chen et al., CVPR 2022): the re-activation scores and loss against a
class-by-class computation, CAMs scored by ReCAM's head, saving, and the stage."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.cam import class_activation_maps
from wsss_core.config import ClassifierConfig, ConfigError
from wsss_core.models import MultiLabelClassifier, build_backbone, build_classifier
from wsss_core.multilabel import load_classifier, multilabel_loss, recam_loss, save_classifier

LITE0 = "efficientnet_lite0"


def _model(num_classes: int = 4, seed: int = 0) -> MultiLabelClassifier:
    torch.manual_seed(seed)
    return build_classifier(ClassifierConfig(weights="random", recam_weight=0.7), num_classes).eval()


def test_recam_head_is_built_only_with_a_weight():
    assert build_classifier(ClassifierConfig(weights="random"), 3).recam_head is None
    head = _model(3).recam_head
    assert head.bias is None and tuple(head.weight.shape) == (3, 1280)  # Lite0 with its 1x1 head conv


def test_recam_logits_equal_a_class_by_class_computation():
    model = _model()
    a = torch.randn(2, 1280, 5, 7).relu()
    with torch.no_grad():
        got = model.recam_logits(a)
        w = model.head.weight
        for b in range(2):
            for k in range(4):
                cam = torch.clamp((w[k][:, None, None] * a[b]).sum(0), min=0)  # ReLU(W_k . A), (h, w)
                cam = cam / (cam.max() + 1e-5)
                pooled = (cam[None] * a[b]).mean((1, 2))  # CAM-weighted mean feature, (C,)
                expected = model.recam_head.weight @ pooled
                assert torch.allclose(got[b, k], expected, rtol=1e-5, atol=1e-6), (b, k)
        logits, reactivated = model(torch.randn(2, 3, 64, 64), recam=True)
    assert tuple(logits.shape) == (2, 4) and tuple(reactivated.shape) == (2, 4, 4)


def test_recam_loss_by_hand_and_against_cross_entropy_per_image():
    # one image, two classes, only class 0 labelled: row 0 = [log 3, 0] -> p = 3/4, CE = log(4/3)
    r = torch.tensor([[[math.log(3.0), 0.0], [5.0, -5.0]]])
    assert recam_loss(r, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    # row 1 would be CE(softmax([5, -5]), 1) = 10 + log(1 + e^-10); with both labelled: their mean
    both = (math.log(4 / 3) + 10 + math.log1p(math.exp(-10))) / 2
    assert recam_loss(r, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(both, rel=1e-6)

    torch.manual_seed(0)
    r = torch.randn(3, 5, 5)
    y = torch.tensor([[1.0, 0, 1, 0, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    expected = 0.0
    for b in range(3):
        k = torch.nonzero(y[b]).flatten()
        if len(k):  # the labelled rows, each with its own class as the target
            expected += F.cross_entropy(r[b, k], k).item()
    assert recam_loss(r, y).item() == pytest.approx(expected / 3, rel=1e-6)  # an unlabelled image adds 0


def test_multilabel_loss_adds_the_weighted_recam_term():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    with torch.no_grad():
        logits, reactivated = model(x, recam=True)
        expected = F.binary_cross_entropy_with_logits(logits, y) + 0.5 * recam_loss(reactivated, y)
        assert multilabel_loss("bce", 0.5)(model, (x, y)).item() == pytest.approx(expected.item(), rel=1e-6)
        plain = multilabel_loss("bce")(model, (x, y))  # weight 0: the recam head is not used
        assert plain.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, y).item(), rel=1e-6)


def test_recam_gradients_reach_both_heads_and_the_backbone():
    model = _model().train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    multilabel_loss("bce", 0.7)(model, (x, y)).backward()
    assert model.recam_head.weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0
    assert model.backbone.conv_stem.weight.grad.abs().sum() > 0


def test_cams_scored_by_the_recam_head_are_recams_plain_cams():
    """ReCAM's CAM of class k: ReLU of A weighted by W_recam[k] * W[k] (both heads, element by element)."""
    model = _model()
    x = torch.randn(3, 70, 90)
    view = model.cam_model(None, "recam")
    res = class_activation_maps(view, x, [2, 4], scales=(1.0,), flip=False, method="gradcam")
    with torch.no_grad():
        a = model.features(x[None])[0]
        w = model.recam_head.weight[[1, 3]] * model.head.weight[[1, 3]]  # classes 2 and 4: head outputs 1 and 3
        cam = torch.clamp(torch.einsum("kc,chw->khw", w, a), min=0)
        up = F.interpolate(cam[None], size=(70, 90), mode="bilinear", align_corners=False)[0].clamp(min=0)
        expected = up / (up.amax((1, 2), keepdim=True) + 1e-5)
    assert np.allclose(res.high_res, expected.numpy(), atol=1e-5)
    # the classifier's own head gives other maps
    other = class_activation_maps(model.cam_model(None, "classifier"), x, [2, 4], scales=(1.0,), flip=False,
                                  method="gradcam")
    assert not np.allclose(other.high_res, res.high_res, atol=1e-2)


def test_cam_model_refuses_a_missing_recam_head_and_an_earlier_layer():
    plain = build_classifier(ClassifierConfig(weights="random"), 3)
    with pytest.raises(ConfigError, match=r"cams\.head: 'recam' needs a classifier trained with "
                                          r"classifier\.recam_weight > 0"):
        plain.cam_model(None, "recam")
    model = _model(3)
    layer = model.backbone.layer_names[-2]
    with pytest.raises(ConfigError, match=rf"cams\.layer: '{layer}' with cams\.head 'recam'"):
        model.cam_model(layer, "recam")
    view = model.cam_model(model.backbone.layer_names[-1], "recam")  # the last layer, named, is accepted
    assert torch.equal(view.head.weight, model.recam_head.weight * model.head.weight) and view.head.bias is None


def test_saved_classifier_keeps_its_recam_head(tmp_path):
    model = _model(3)
    save_classifier(tmp_path / "model.pt", model, ClassifierConfig(weights="random", recam_weight=0.7),
                    [1, 2, 3], ["background", "a", "b", "c"])
    loaded = load_classifier(tmp_path / "model.pt").model
    assert torch.equal(loaded.recam_head.weight, model.recam_head.weight)
    plain = MultiLabelClassifier(build_backbone(LITE0, "random"), 3)
    save_classifier(tmp_path / "plain.pt", plain, ClassifierConfig(weights="random"), [1, 2, 3],
                    ["background", "a", "b", "c"])
    assert load_classifier(tmp_path / "plain.pt").model.recam_head is None


def test_label_filter_trains_without_a_recam_head():
    from wsss_core.config import load_config
    from wsss_core.label_filter import _filter_classifier_config

    from conftest import REPO

    from wsss_core import stages

    cfg = load_config(REPO / "params" / "ci.yaml", {"classifier.recam_weight": 0.7})
    assert cfg.classifier.recam_weight == 0.7 and _filter_classifier_config(cfg).recam_weight == 0.0
    # nor is the filter redone when only the classifier's ReCAM keys or its seed change: each key alone,
    # at a value other than its default (a default would leave the classifier's fingerprint as it is too)
    base = load_config(REPO / "params" / "ci.yaml")
    run_a = stages.open_run("/nonexistent/a", base)
    changes = {"classifier.recam_weight": 0.7, "classifier.recam_epochs": 2, "classifier.recam_lr": 3e-4,
               "classifier.seed": 5}
    for key, value in changes.items():
        run_b = stages.open_run("/nonexistent/b", load_config(REPO / "params" / "ci.yaml", {key: value}))
        assert run_a.fingerprint("classifier") != run_b.fingerprint("classifier"), key
        assert run_a.fingerprint("label_filter") == run_b.fingerprint("label_filter"), key
    own = stages.open_run("/nonexistent/c", load_config(REPO / "params" / "ci.yaml", {"label_filter.seed": 5}))
    assert own.fingerprint("label_filter") != run_a.fingerprint("label_filter")
    assert own.fingerprint("classifier") == run_a.fingerprint("classifier")


def test_cams_stage_with_the_recam_head(tmp_path):
    from wsss_core import stages
    from wsss_core.artifacts import CAMS, model_path
    from wsss_core.config import load_config
    from wsss_core.data import open_dataset
    from wsss_core.data.transforms import to_normalized_tensor

    from conftest import REPO

    bad = load_config(REPO / "params" / "ci.yaml", {"cams.head": "recam", "label_filter.enabled": False})
    with pytest.raises(ConfigError, match=r"cams\.head: 'recam' needs a classifier trained with"):
        stages.check_stage("cams", bad)  # the up-front check `wsss run` makes before any stage

    cfg = load_config(REPO / "params" / "ci.yaml", {"cams.head": "recam", "classifier.recam_weight": 0.7,
                                                     "label_filter.enabled": False})
    run = stages.open_run(tmp_path / "run", cfg)
    for name in ("data", "classifier", "label_filter", "cams"):
        stages.run_stage(name, cfg, run)
    trained = load_classifier(model_path(run, "classifier"))
    assert trained.model.recam_head is not None
    # the classifier's epochs, then ReCAM's fine-tuning (its own checkpoint folder), in one history
    history = json.loads((run.make_folder("classifier") / "history.json").read_text())
    epochs, tuning = cfg.classifier.epochs, cfg.classifier.recam_epochs
    assert [h["epoch"] for h in history] == list(range(1, epochs + tuning + 1))
    assert [h.get("phase") for h in history] == [None] * epochs + ["recam"] * tuning
    assert (run.make_folder("classifier") / "recam" / "checkpoint.pt").is_file()
    images = open_dataset(cfg.data, validate=False).labelled(cfg.cams.split)
    mean, std = trained.meta["normalization"]
    sid = sorted(p.stem for p in (run.make_folder("cams") / "cams").glob("*.npz"))[0]
    stored = CAMS.read(run, sid)
    x = to_normalized_tensor(images[images.position(sid)][0], mean, std)

    def cams_by(model):
        return class_activation_maps(model, x, stored.keys.tolist(), scales=cfg.cams.scales, flip=cfg.cams.flip,
                                     method=cfg.cams.method, normalize=cfg.cams.normalize,
                                     head_class_ids=trained.class_ids).high_res

    assert np.allclose(stored.high_res, cams_by(trained.model.cam_model(None, "recam")), atol=1e-5)
    assert not np.allclose(stored.high_res, cams_by(trained.model), atol=1e-3)  # not the classifier's head
