"""Model layer: offline ImageNet weights for EfficientNet-Lite0 (name mapping,
top-1 on skimage's chelsea / coffee), output strides and stage channels of
every backbone, clear weight errors, and the GAP + linear classifier."""

import io
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata

from wsss_core.config import ClassifierConfig, ConfigError
from wsss_core.models import (
    BACKBONES,
    MultiLabelClassifier,
    WeightsError,
    WeightsNotFoundError,
    build_backbone,
    build_classifier,
    imagenet_lite0,
    lite0_name_map,
    param_groups,
)
from wsss_core.models import factory, weights
from wsss_core.models.efficientnet import shipped_weights

LITE0 = "efficientnet_lite0"


def _weights(name: str) -> str:
    """ImageNet where it is offline (EfficientNet), else random: no download in tests."""
    return "imagenet" if name == LITE0 else "random"


@pytest.fixture(scope="module")
def shipped_state():
    return shipped_weights().load()


@pytest.fixture(scope="module")
def imagenet_model():
    return imagenet_lite0()


def _imagenet_input(image: np.ndarray, mean, std) -> torch.Tensor:
    """Whole image resized to 224 x 224 (bicubic, antialiased), normalised."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- ImageNet weights
@pytest.mark.parametrize("name, image, cls", [("chelsea", skdata.chelsea, 285), ("coffee", skdata.coffee, 967)])
def test_efficientnet_lite0_imagenet_top1(imagenet_model, name, image, cls):
    cfg = imagenet_model.pretrained_cfg
    mean, std = build_backbone(LITE0, "random").normalization
    assert (tuple(cfg["mean"]), tuple(cfg["std"]), cfg["input_size"]) == (mean, std, (3, 224, 224))
    with torch.no_grad():
        probs = imagenet_model(_imagenet_input(image(), mean, std)).softmax(1)[0]
    top = int(probs.argmax())
    print(f"{name}: top-1 {top} p={float(probs[top]):.3f}")
    assert top == cls and probs[cls] > 0.5


def test_lite0_name_map_is_complete_and_follows_the_documented_rules(shipped_state):
    mapping = lite0_name_map(shipped_state)
    timm_keys = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert len(mapping) == len(shipped_state) == len(timm_keys) == 296
    assert list(mapping.values()) == timm_keys  # a bijection, in order
    assert mapping == {k: _documented_name(k) for k in shipped_state}


def _documented_name(key: str) -> str:
    """The mapping as the efficientnet module documents it, derived by rule."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first, rest = key.split(".", 1)
    if first != "_blocks":
        return f"{top[first]}.{rest}"
    i, layer, kind = rest.split(".")
    starts = np.cumsum([0, 1, 2, 2, 3, 3, 4, 1])
    s = int(np.searchsorted(starts, int(i), side="right")) - 1
    names = (
        {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
        if i == "0"
        else {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
    )
    return f"blocks.{s}.{int(i) - starts[s]}.{names[layer]}.{kind}"


def test_lite0_name_map_rejects_files_that_do_not_line_up(shipped_state):
    bad_shape = dict(shipped_state)
    bad_shape["_blocks.3._project_conv.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(WeightsError, match=r"tensor \d+ _blocks\.3\._project_conv\.weight \(1, 1, 1, 1\)"):
        lite0_name_map(bad_shape)
    short = dict(list(shipped_state.items())[:-1])
    with pytest.raises(WeightsError, match="expected 296 tensors, found 295"):
        lite0_name_map(short)


def test_backbone_holds_exactly_the_mapped_weights_and_matches_timm(imagenet_model):
    backbone = build_backbone(LITE0, "imagenet", 16).eval()
    full = imagenet_model.state_dict()
    own = backbone.state_dict()
    assert set(own) == {k for k in full if not k.startswith("classifier.")}
    assert all(torch.equal(own[k], full[k]) for k in own)
    reference = imagenet_lite0(output_stride=16)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(backbone(x), reference.forward_features(x))


# --------------------------------------------------------------------------- strides and stages
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_output_stride_and_stage_channels(name, output_stride):
    backbone = build_backbone(name, _weights(name), output_stride).eval()
    with torch.no_grad():
        stages = backbone.forward_stages(torch.randn(1, 3, 64, 64))
        last = backbone(torch.randn(1, 3, 64, 64))
    assert backbone.stride == output_stride and backbone.stage_strides[-1] == output_stride
    assert tuple(s.shape[1] for s in stages) == backbone.stage_channels
    assert [tuple(s.shape[2:]) for s in stages] == [(64 // k, 64 // k) for k in backbone.stage_strides]
    assert backbone.out_channels == backbone.stage_channels[-1]
    assert last.shape == (1, backbone.out_channels, 64 // output_stride, 64 // output_stride)
    assert backbone.stage_strides[:3] == (2, 4, 8)  # the stem, then IRNet's stride-4 and stride-8 stages


@pytest.mark.parametrize("output_stride, size", [(8, 28), (16, 14)])
def test_224_input_gives_28_or_14(output_stride, size):
    model = build_classifier(ClassifierConfig(weights="imagenet", output_stride=output_stride), 3).eval()
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 224, 224)).shape == (1, 1280, size, size)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_normalization_and_cam_layer(name):
    backbone = build_backbone(name, _weights(name)).eval()
    mean, std = backbone.normalization
    assert len(mean) == len(std) == 3
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (mean, std) == (((0.5,) * 3, (0.5,) * 3) if name == LITE0 else imagenet)
    seen = []
    handle = backbone.cam_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert torch.equal(seen[0], out)


# --------------------------------------------------------------------------- weight errors
def test_unknown_backbone_or_stride_is_a_clear_error():
    known = "known backbones: efficientnet_lite0, resnet50, vgg16_gap"
    with pytest.raises(ValueError, match=f"unknown backbone 'resnet5o'; {known}"):
        build_backbone("resnet5o")
    with pytest.raises(ValueError, match="output_stride must be 8 or 16, got 32"):
        build_backbone(LITE0, "random", 32)


def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsNotFoundError, match="weights file not found: " + re.escape(str(path))) as info:
        build_backbone("resnet50", str(path))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ConfigError)


def test_weights_file_with_wrong_keys_lists_them(tmp_path):
    path = tmp_path / "wrong.pth"
    state = build_backbone(LITE0, "random").state_dict()
    state.pop("conv_head.weight")
    state["bogus.weight"] = torch.zeros(2)
    state["bn2.bias"] = torch.zeros(7)
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        build_backbone(LITE0, str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: does not fit backbone 'efficientnet_lite0'")
    assert "1 missing keys: conv_head.weight" in msg and "1 unexpected keys: bogus.weight" in msg
    assert "bn2.bias (7,) vs (1280,)" in msg
    (tmp_path / "junk.pth").write_text("not a tensor file")
    with pytest.raises(WeightsError, match=r"junk.pth: cannot read this state dict \(not a file torch saved\)"):
        build_backbone(LITE0, str(tmp_path / "junk.pth"))


def test_unavailable_imagenet_download_fails_fast_before_building(tmp_path, monkeypatch):
    monkeypatch.setattr(weights.torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "host_reachable", lambda host, *a, **k: False)
    for name in ("resnet50", "vgg16_gap"):
        entry = BACKBONES[name]
        monkeypatch.setitem(BACKBONES, name, factory.BackboneEntry(_must_not_build, entry.imagenet))
        with pytest.raises(WeightsError, match=f"ImageNet weights for '{name}' are not in the torch.hub cache"
                                               r".*Pass the path of a local state-dict file"):
            build_backbone(name, "imagenet")


def _must_not_build(output_stride: int):
    raise AssertionError("the network was built before the weights were resolved")


def test_hub_cache_is_used_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(weights.torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(weights, "host_reachable", _no_network)
    source = factory.resolve_weights("resnet50", "imagenet")
    cached = tmp_path / "checkpoints" / "resnet50-0676ba61.pth"
    assert source.kind == "url"  # not cached yet: would download (host probe patched to pass)
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert factory.resolve_weights("resnet50", "imagenet") == weights.WeightsSource("file", str(cached))


def _no_network(host, *a, **k):
    assert host == "download.pytorch.org"
    return True


# --------------------------------------------------------------------------- loading formats
def test_saved_backbone_and_classifier_files_load(tmp_path):
    torch.manual_seed(0)
    model = MultiLabelClassifier(build_backbone(LITE0, "random"), 4)
    torch.save(model.backbone.state_dict(), tmp_path / "backbone.pth")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "classifier.pth")
    for file in ("backbone.pth", "classifier.pth"):
        loaded = build_backbone(LITE0, str(tmp_path / file))
        assert loaded.weights_source == str(tmp_path / file)
        assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_torchvision_files_drop_the_head_and_keep_new_layers():
    import torchvision

    resnet = build_backbone("resnet50", "random")
    source = torchvision.models.resnet50().state_dict()  # includes fc.*
    resnet.load_pretrained(source, "resnet50.pth")
    assert torch.equal(resnet.state_dict()["layer4.2.conv3.weight"], source["layer4.2.conv3.weight"])
    vgg = build_backbone("vgg16_gap", "random")
    extra = {k: v.clone() for k, v in vgg.state_dict().items() if k.startswith("extra.")}
    own = vgg.state_dict()
    source = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in own.items() if k.startswith("features.")}
    source["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's ImageNet head: ignored
    vgg.load_pretrained(source, "vgg16_bn.pth")
    assert torch.equal(vgg.state_dict()["features.40.weight"], source["features.40.weight"])
    assert all(torch.equal(vgg.state_dict()[k], v) for k, v in extra.items())


# --------------------------------------------------------------------------- classifier
def test_logits_are_head_of_mean_features_exactly():
    model = build_classifier(ClassifierConfig(weights="imagenet"), 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model.features(x)
        assert torch.equal(model(x), model.head(a.mean((2, 3))))
        assert torch.equal(model.logits_from_features(a), model(x))
    assert model.cam_layer is model.backbone and model.cam_layer_name == "backbone"
    assert model.head.in_features == model.backbone.out_channels and model.head.out_features == 5


@pytest.mark.parametrize("backbone, output_stride", [(LITE0, 16), ("resnet50", 8), ("vgg16_gap", 16)])
def test_state_dict_round_trip(backbone, output_stride):
    cfg = ClassifierConfig(backbone=backbone, weights="random", output_stride=output_stride)
    torch.manual_seed(1)
    model = build_classifier(cfg, 1).eval()  # num_classes=1: the missing-label filter
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(2)
    other = build_classifier(cfg, 1).eval()
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_param_groups_split_backbone_new_layers_and_head():
    model = MultiLabelClassifier(build_backbone("vgg16_gap", "random"), 3)
    groups = param_groups(model, lr=1e-3, backbone_lr_mult=0.1, weight_decay=1e-5)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone", pytest.approx(1e-4), 1e-5), ("backbone_new", 1e-3, 1e-5), ("head", 1e-3, 1e-5)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.backbone.extra.parameters()}
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in model.head.parameters()}
    model = MultiLabelClassifier(build_backbone(LITE0, "random"), 3)
    for p in model.backbone.conv_stem.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, 1e-3, 0.1, 0.0)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    torch.optim.Adam(groups, lr=1e-3)  # accepted as is


def test_build_classifier_rejects_bad_class_counts():
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        MultiLabelClassifier(build_backbone(LITE0, "random"), 0)


def test_wsss_run_starts_each_notebook_s_stages_as_a_fresh_kernel_did():
    """The first ImageNet Lite0 load in a process draws from the seeded RNG (its layout's random model): the
    stages that `wsss run` now runs in one process clear it where a notebook's kernel used to start, so a
    stage draws the same numbers whatever ran before it (the ci run's outputs stay byte for byte)."""
    from wsss_core.models.efficientnet import imagenet_lite0
    from wsss_core.pipeline import _as_in_a_fresh_kernel
    from wsss_core.runtime import seed_everything

    def after_a_load(clear: bool):
        if clear:
            _as_in_a_fresh_kernel()
        seed_everything(0)
        imagenet_lite0(32)
        return torch.rand(4)

    fresh = after_a_load(True)
    assert torch.equal(after_a_load(True), fresh)
    assert not torch.equal(after_a_load(False), fresh)  # what a second stage in the process drew without it
