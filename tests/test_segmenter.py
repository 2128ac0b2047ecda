"""DeepLabV3+ (segmentation-models-pytorch): any input size at output stride 8 / 16,
the shipped EfficientNet-Lite0 weights loaded strictly into the encoder (same
tensors and features as the classifier's backbone), save / load, ignore 255."""

import re

import pytest
import torch
import torchvision
from torch import nn

from wsss_core.models import (
    WeightsError,
    build_backbone,
    build_segmenter,
    load_segmenter,
    save_segmenter,
    segmentation_loss,
)
from wsss_core.models.efficientnet import shipped_weights, to_timm_names
from wsss_core.models.segmenter import load_encoder_weights

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def timm_named_state():
    """The shipped ImageNet file, renamed to timm's names (with the ImageNet head)."""
    return to_timm_names(shipped_weights().load())


@pytest.mark.parametrize("output_stride", [8, 16])
def test_lite0_logits_have_the_input_size(output_stride):
    model = build_segmenter(LITE0, 4, output_stride, atrous_rates=(6, 12, 18), weights="random").eval()
    assert model.pad_multiple == output_stride
    rates = [m.dilation[0] for m in model.net.decoder.aspp[0].convs.modules()
             if isinstance(m, nn.Conv2d) and m.dilation[0] > 1]
    assert rates == [6, 12, 18]
    with torch.no_grad():
        assert model.encoder_features(torch.zeros(1, 3, 64, 64))[-1].shape[-1] == 64 // output_stride
        for h, w in [(61, 47), (97, 130), (5, 3)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 4, h, w)
        x = torch.randn(1, 3, 64, 48)  # a multiple already: no padding, smp's own output
        assert torch.equal(model(x), model.net(x))


def test_resnet50_logits_have_the_input_size_and_torchvision_weights_load():
    model = build_segmenter("resnet50", 3, 16, weights="random").eval()
    assert model.normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 61, 47)).shape == (2, 3, 61, 47)
    source = torchvision.models.resnet50().state_dict()  # torchvision's layout, with the fc head
    load_encoder_weights(model, source, "resnet50.pth")
    encoder = model.encoder.state_dict()
    assert set(source) - set(encoder) == {"fc.weight", "fc.bias"}
    assert all(torch.equal(v, source[k]) for k, v in encoder.items())
    del source["layer4.2.bn3.running_var"]
    with pytest.raises(WeightsError, match="resnet50.pth: .*1 missing keys: layer4.2.bn3.running_var"):
        load_encoder_weights(model, source, "resnet50.pth")


def test_lite0_imagenet_encoder_equals_the_classifier_backbone(timm_named_state):
    model = build_segmenter(LITE0, 2, 16, weights="imagenet").eval()
    assert model.normalization == ((0.5,) * 3, (0.5,) * 3)
    encoder = model.encoder.model.state_dict()
    assert set(timm_named_state) - set(encoder) == {
        "conv_head.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
        "bn2.num_batches_tracked", "classifier.weight", "classifier.bias"}
    assert all(torch.equal(v, timm_named_state[k]) for k, v in encoder.items())
    backbone = build_backbone(LITE0, "imagenet", 16).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        stages = backbone.forward_stages(x)
        feats = model.encoder_features(x)
    assert feats[1].shape == stages[0].shape == (1, 16, 32, 48)
    assert feats[2].shape == stages[1].shape == (1, 24, 16, 24)
    for i in range(4):  # strides 2, 4, 8, 16: the classifier's first four stages
        assert torch.equal(feats[i + 1], stages[i])


def test_encoder_weights_must_fit_exactly(tmp_path, timm_named_state):
    missing = dict(timm_named_state)
    del missing["blocks.2.1.conv_dw.weight"]
    extra = dict(timm_named_state, **{"blocks.7.0.conv_pw.weight": torch.zeros(1)})
    for name, state, message in [("missing.pth", missing, "1 missing keys: blocks.2.1.conv_dw.weight"),
                                 ("extra.pth", extra, "1 unexpected keys: blocks.7.0.conv_pw.weight")]:
        torch.save(state, tmp_path / name)
        with pytest.raises(WeightsError, match=re.escape(f"{tmp_path / name}: does not fit the {LITE0} encoder")
                           + ".*" + re.escape(message)):
            build_segmenter(LITE0, 2, weights=str(tmp_path / name))
    short = dict(list(shipped_weights().load().items())[:-1])  # shipped layout, one tensor short
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match="short.pth: EfficientNet-Lite0 weights: expected 296 tensors, found 295"):
        build_segmenter(LITE0, 2, weights=str(tmp_path / "short.pth"))


def test_save_load_round_trip_and_param_groups(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter(LITE0, 3, 8, atrous_rates=(12, 24, 36), weights="random")
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 40, 40))  # move the BatchNorm statistics away from their init
    model.eval()
    path = save_segmenter(tmp_path / "segmenter.pt", model, extra={"classes": ["bg", "a", "b"]})
    torch.manual_seed(1)
    loaded = load_segmenter(path)
    assert not loaded.training and loaded.extra == {"classes": ["bg", "a", "b"]}
    assert (loaded.backbone_name, loaded.num_classes, loaded.output_stride, loaded.atrous_rates) == (
        LITE0, 3, 8, (12, 24, 36))
    x = torch.randn(1, 3, 61, 47)
    with torch.no_grad():  # loaded channels-last (oneDNN's NHWC convolutions): the same maths, other rounding
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    convs = [m for m in loaded.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))

    groups = model.param_groups(lr=1e-2, backbone_lr_mult=0.1, weight_decay=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", pytest.approx(1e-3)), ("head", 1e-2)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.encoder.parameters()}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())


def test_cross_entropy_ignores_255():
    void = 255  # the VOC void value, as in the masks on disk (not the module's constant)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4)
    masks = torch.randint(0, 3, (2, 5, 4))
    masks[0, :2] = void
    masks[1, 4, 3] = void
    loss = segmentation_loss()
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[masks == void] = 100.0
    assert torch.equal(loss(changed, masks), loss(logits, masks))
    assert not torch.equal(loss(logits, masks), nn.functional.cross_entropy(logits, masks.clamp(max=2)))
    # by hand: the mean of -log softmax at the true class over the pixels that are not void
    log_p = logits.permute(0, 2, 3, 1).reshape(-1, 3).log_softmax(-1)
    target = masks.reshape(-1)
    kept = target != void
    assert int(kept.sum()) == 2 * 5 * 4 - 2 * 4 - 1
    expected = -log_p[kept].gather(1, target[kept, None]).mean()
    assert float(loss(logits, masks)) == pytest.approx(float(expected), rel=1e-6)


def test_load_names_a_missing_or_foreign_model_file(tmp_path):
    from wsss_core.models import WeightsError
    from wsss_core.models.boundary import load_boundary

    with pytest.raises(WeightsError, match=re.escape(f"{tmp_path / 'nope.pt'}: segmenter file not found")):
        load_segmenter(tmp_path / "nope.pt")
    torch.save({"format": "wsss-segmenter-1", "segmenter": {}}, tmp_path / "seg.pt")
    with pytest.raises(WeightsError, match=re.escape(f"{tmp_path / 'seg.pt'}: not a saved boundary model")):
        load_boundary(tmp_path / "seg.pt")  # a segmenter file given as the boundary net
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="list.pt: not a saved segmenter"):
        load_segmenter(tmp_path / "list.pt")
    (tmp_path / "notes.pt").write_text("not a model")
    with pytest.raises(WeightsError, match=r"notes.pt: cannot read this segmenter \(not a file torch saved\)"):
        load_segmenter(tmp_path / "notes.pt")
