"""IRNet boundary network: stride-4 output for odd sizes, frozen backbone (no grad,
BatchNorm statistics untouched), flip inference, save / load."""

import pytest
import torch

from wsss_core.cam_maps import stride4_size
from wsss_core.models import BoundaryNet, WeightsError, boundary_with_flip, build_backbone, load_boundary, save_boundary

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_backbone_state():
    return build_backbone(LITE0, "imagenet", 16).state_dict()


def _lite0_net(state, seed: int = 0) -> BoundaryNet:
    """A lite0 boundary net with ImageNet weights (copied from the fixture) and a seeded branch."""
    backbone = build_backbone(LITE0, "random", 16)
    backbone.load_state_dict(state)
    torch.manual_seed(seed)
    return BoundaryNet(backbone)


@pytest.mark.parametrize("name, weights, output_stride", [(LITE0, "imagenet", 16), (LITE0, "imagenet", 8),
                                                          ("resnet50", "random", 16)])
def test_output_is_stride4_size_in_unit_range(name, weights, output_stride):
    torch.manual_seed(0)
    model = BoundaryNet(build_backbone(name, weights, output_stride)).eval()
    assert model.backbone.stage_strides[-1] == output_stride
    for h, w in [(61, 47), (33, 64)]:
        with torch.no_grad():
            out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 1, *stride4_size(h, w))
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_only_the_branch_trains_and_backbone_statistics_stay(lite0_backbone_state):
    model = _lite0_net(lite0_backbone_state).train()
    assert not model.backbone.training and not any(m.training for m in model.backbone.modules())
    assert model.branch.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.branch.parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    groups = model.param_groups(lr=0.1, weight_decay=1e-4)
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("head", 0.1, 1e-4, len(trainable))]
    before_backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    before_branch = {k: v.clone() for k, v in model.branch.state_dict().items()}
    opt = torch.optim.SGD(groups, lr=0.1)
    x = torch.randn(2, 3, 48, 40) * 2  # far from ImageNet statistics: train-mode BN would move a lot
    loss = (model(x) - torch.rand(2, 1, 12, 10)).pow(2).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(v, before_backbone[k]) for k, v in model.backbone.state_dict().items())
    changed = [k for k, v in model.branch.state_dict().items() if not torch.equal(v, before_branch[k])]
    assert "fuse.weight" in changed and "stages.0.0.weight" in changed and "stages.3.1.weight" in changed


def test_flip_inference_averages_logits_with_the_flipped_image(lite0_backbone_state):
    model = _lite0_net(lite0_backbone_state).eval()
    half = torch.rand(1, 3, 40, 32)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)  # 40 x 64, mirror image of itself
    with torch.no_grad():
        plain = model(symmetric)
    assert not torch.equal(plain, plain.flip(-1))  # TF "same" padding is asymmetric: one pass is not
    out = boundary_with_flip(model, symmetric)
    assert out.shape == (1, 1, 10, 16) and torch.equal(out, out.flip(-1))
    x = torch.rand(2, 3, 45, 38)
    with torch.no_grad():
        expected = torch.sigmoid((model.forward_logits(x) + model.forward_logits(x.flip(-1)).flip(-1)) / 2)
    assert torch.allclose(boundary_with_flip(model, x), expected, atol=1e-6)


def test_save_load_round_trip(tmp_path, lite0_backbone_state):
    model = _lite0_net(lite0_backbone_state, seed=1).eval()
    path = save_boundary(tmp_path / "boundary.pt", model, LITE0, 16)
    blob = torch.load(path, weights_only=True)
    assert all(k.startswith(("stages.", "fuse.")) for k in blob["branch"])  # the frozen backbone is not stored
    torch.manual_seed(2)  # another branch init: the loaded weights must replace it
    loaded = load_boundary(path)
    assert not loaded.training and loaded.normalization == ((0.5,) * 3, (0.5,) * 3)
    x = torch.randn(1, 3, 61, 47)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="does not describe the model's backbone"):
        save_boundary(tmp_path / "x.pt", model, LITE0, 8)


def test_load_refuses_a_branch_trained_on_another_backbone(tmp_path, lite0_backbone_state):
    model = _lite0_net(lite0_backbone_state)
    with torch.no_grad():
        model.backbone.conv_stem.weight.mul_(2)  # fine-tuned / other weights than the rebuilt ImageNet ones
    save_boundary(tmp_path / "boundary.pt", model, LITE0, 16)
    with pytest.raises(WeightsError, match="differs from the one the boundary branch was trained on"):
        load_boundary(tmp_path / "boundary.pt")


def _edge_image(h: int, w: int, vertical: bool) -> torch.Tensor:
    """A normalised image whose only edge is one straight line: a vertical edge at column 48 (the
    image does not change down its height) or a horizontal one at row 40."""
    x = torch.full((1, 3, h, w), 0.6)
    if vertical:
        x[..., :, 48:] = -0.8
    else:
        x[..., 40:, :] = -0.8
    return x


@pytest.mark.parametrize("vertical", [True, False])
def test_an_odd_size_changes_no_logit_at_the_top_or_left_edge(lite0_backbone_state, vertical):
    """The probe's bright band along the top edge of every msrc boundary map: TF-style "same" padding
    pads the top (odd height) or left (odd width) of an input, which even training crops never show.
    An image one row (column) longer, along which nothing changes, must give the same logits
    everywhere but next to the far edge."""
    model = _lite0_net(lite0_backbone_state).eval()
    # both sizes pad to the same multiple of 32, and the extra row (column) repeats what is there
    even, odd = ((212, 96), (213, 96)) if vertical else ((64, 96), (64, 95))
    with torch.no_grad():
        a = model.forward_logits(_edge_image(*even, vertical))
        b = model.forward_logits(_edge_image(*odd, vertical))
    assert b.shape[-2:] == stride4_size(*odd)
    common = tuple(min(x, y) for x, y in zip(a.shape[-2:], b.shape[-2:]))
    a, b = a[..., : common[0], : common[1]], b[..., : common[0], : common[1]]
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


# --------------------------------------------------------------------------- the stem input (IRNet's first edge input)
def test_resnet50_stem_input_is_irnets_first_edge_input():
    """With stem_input, ResNet-50's branch reads IRNet's five edge inputs: x1 = maxpool(relu(bn1(conv1)))
    at stride 4, then layer1..layer4. Computed here from torchvision's modules by hand, each through its
    branch layer, upsampled to the stride-4 grid and fused: the model must give the same logits."""
    torch.manual_seed(0)
    model = BoundaryNet(build_backbone("resnet50", "random", 16), stem_input=True).eval()
    bb, br = model.backbone, model.branch
    assert len(br.stages) == 5 and br.stages[0][0].in_channels == 64
    x = torch.randn(1, 3, 64, 96)  # a multiple of 32: no padding
    with torch.no_grad():
        x1 = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
        x2 = bb.layer1(x1)
        x3 = bb.layer2(x2)
        x4 = bb.layer3(x3)
        x5 = bb.layer4(x4)
        up = torch.nn.functional.interpolate
        maps = [br.stages[0](x1), br.stages[1](x2)] + [
            up(br.stages[i](f), scale_factor=k, mode="bilinear", align_corners=False)
            for i, f, k in [(2, x3, 2), (3, x4, 4), (4, x5, 4)]]
        expected = br.fuse(torch.cat(maps, dim=1))
        assert x1.shape[-2:] == expected.shape[-2:] == (16, 24)
        assert torch.allclose(model.forward_logits(x), expected, atol=1e-5)


def test_stem_input_adds_one_trained_stage_and_survives_save_load(tmp_path, lite0_backbone_state):
    backbone = build_backbone(LITE0, "random", 16)
    backbone.load_state_dict(lite0_backbone_state)
    torch.manual_seed(0)
    model = BoundaryNet(backbone, stem_input=True).train()
    assert [s[0].in_channels for s in model.branch.stages] == [16, 24, 40, 112, 1280]
    assert model.branch.fuse.in_channels == 5 * 32
    loss = model(torch.randn(2, 3, 64, 64)).mean()
    loss.backward()
    assert float(model.branch.stages[0][0].weight.grad.abs().sum()) > 0  # the stem's layer learns
    path = save_boundary(tmp_path / "boundary.pt", model.eval(), LITE0, 16)
    assert torch.load(path, weights_only=True)["stem_input"] is True
    loaded = load_boundary(path)
    assert loaded.stem_input and len(loaded.branch.stages) == 5
    x = torch.randn(1, 3, 61, 47)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    without = _lite0_net(lite0_backbone_state)  # the default reads the stages from stride 4 on
    assert [s[0].in_channels for s in without.branch.stages] == [24, 40, 112, 1280]


def test_a_model_saved_before_the_stem_input_loads_without_it(tmp_path, lite0_backbone_state):
    model = _lite0_net(lite0_backbone_state, seed=3).eval()
    path = save_boundary(tmp_path / "boundary.pt", model, LITE0, 16)
    blob = torch.load(path, weights_only=True)
    del blob["stem_input"]  # what save_boundary wrote before the key existed
    torch.save(blob, path)
    loaded = load_boundary(path)
    assert not loaded.stem_input
    x = torch.randn(1, 3, 45, 38)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _support_centre(x: torch.Tensor, out: torch.Tensor, r: int, c: int) -> tuple[float, float]:
    """Midpoint (row, column) of the input pixels that reach output cell (r, c): the gradient's support."""
    (g,) = torch.autograd.grad(out[0, :, r, c].sum(), x, retain_graph=True)
    rows = torch.nonzero(g[0].abs().sum((0, 2)) > 0)[:, 0]
    cols = torch.nonzero(g[0].abs().sum((0, 1)) > 0)[:, 0]
    return (float(rows.min() + rows.max()) / 2, float(cols.min() + cols.max()) / 2)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "vgg16_gap"])
def test_the_pooled_stem_is_centred_on_the_backbones_own_stride4_cells(name):
    """Each cell of the pooled stem must see the image around the same point as the cell of the stride-4
    stage it is fused with. A 3x3 pool padded on both sides puts Lite0's cells (TF "same" convolutions pad
    the bottom and right only) 2 pixels up and left of the grid, and VGG's (2x2 pools) 1 pixel."""
    torch.manual_seed(0)
    backbone = build_backbone(name, "random", 16).eval()
    pool = BoundaryNet(backbone, stem_input=True).branch.stem_pool
    x = torch.randn(1, 3, 96, 96, requires_grad=True)
    stem, stride4 = backbone.forward_stages(x)[:2]
    from wsss_core.models.boundary import pool_stem

    pooled = pool_stem(stem, pool)
    assert pooled.shape[-2:] == stride4.shape[-2:] == (24, 24)
    assert _support_centre(x, pooled, 12, 12) == _support_centre(x, stride4, 12, 12)
