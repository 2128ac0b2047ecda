"""CAMs: Grad-CAM / Grad-CAM++ against pytorch-grad-cam, closed form vs autograd,
multi-scale + flip aggregation, normalisation, shapes, class selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.store import FileError, save_npz
from wsss_core.cam import (
    class_activation_maps,
    has_gap_linear_head,
    head_indices,
    raw_cams,
    scaled_size,
    select_classes,
)
from wsss_core.cam_maps import CamResult, stride4_size

try:  # the test-only peer (`grad-cam` on PyPI, a dev dependency)
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError:  # pragma: no cover
    GradCAM = GradCAMPlusPlus = None

METHODS = ("gradcam", "gradcam++")
PEERS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
needs_peer = pytest.mark.usefixtures("grad_cam_peer")


# --------------------------------------------------------------------------- tiny models
class GapHead(nn.Module):
    """The MultiLabelClassifier contract: `body` outputs A, logits = head(GAP(A))."""

    def features(self, x):
        return self.body(x)

    def logits_from_features(self, a):
        return self.head(a.mean((2, 3)))

    def forward(self, x):
        return self.logits_from_features(self.features(x))


class GapNet(GapHead):
    """A small GAP + linear classifier."""

    def __init__(self, channels: int = 16, classes: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(channels, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.body[1].running_var.fill_(1.0)


class ConvHeadNet(GapNet):
    """Has `head: nn.Linear`, but logits are not GAP + linear of A: the gradient
    varies over space (and is 0 in places), so only autograd is right."""

    def __init__(self, channels: int = 16, classes: int = 5, seed: int = 1):
        super().__init__(channels, classes, seed)
        g = torch.Generator().manual_seed(seed + 100)
        self.extra = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.extra.weight.copy_(torch.randn(self.extra.weight.shape, generator=g) * 0.5)
            self.extra.bias.copy_(torch.randn(channels, generator=g) * 0.5)

    def logits_from_features(self, a):
        return self.head(F.relu(self.extra(a)).pow(2).mean((2, 3)))


class MirrorNet(GapHead):
    """Stride-1 convs with left-right symmetric kernels: exactly flip-equivariant."""

    def __init__(self, channels: int = 8, classes: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 5, padding=2), nn.ReLU())
        self.head = nn.Linear(channels, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for conv in (self.body[0], self.body[2]):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)


class TimmGap(GapHead):
    """timm tf_efficientnet_lite0 (random init) as a GAP + linear classifier."""

    def __init__(self, classes: int = 4):
        super().__init__()
        import timm  # a dependency of the package
        torch.manual_seed(0)
        self.body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
        self.head = nn.Linear(self.body.num_features, classes)


def _image(h: int, w: int, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (3, h, w) if batch is None else (batch, 3, h, w)
    return torch.randn(shape, generator=g)


@pytest.fixture(scope="module")
def timm_model():
    return TimmGap().eval()


# --------------------------------------------------------------------------- the peer
def _peer(model: nn.Module, x: torch.Tensor, head_index: int, method: str):
    """pytorch-grad-cam on `model.body`: (its final output (B, H, W), its internal
    ReLU'd un-normalised map at feature resolution (B, h, w))."""
    targets = [ClassifierOutputTarget(head_index) for _ in range(len(x))]
    layer = model.body if hasattr(model, "body") else model.cam_layer  # the module whose output is A
    with PEERS[method](model=model, target_layers=[layer]) as cam:
        out = cam(input_tensor=x, targets=targets)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, layer, targets, acts, grads)
    return out, np.maximum(raw, 0)


def _compare_with_peer(model: nn.Module, x: torch.Tensor, method: str, closed_form: bool | None) -> int:
    """Every class: our raw map == the peer's, internally and after the peer's
    resize + min-max normalisation. Returns how many maps were non-trivial."""
    height, width = x.shape[-2:]
    nontrivial = 0
    with torch.no_grad():
        n_out = model(x).shape[1]
    ours_all = raw_cams(model, x, list(range(1, n_out + 1)), method=method, closed_form=closed_form).numpy()
    for j in range(n_out):
        peer_out, peer_raw = _peer(model, x, j, method)
        ours = ours_all[:, j]
        assert ours.shape == peer_raw.shape
        top = max(float(peer_raw.max()), 1e-12)
        assert np.abs(ours / top - peer_raw / top).max() <= 1e-4
        # the peer's own output pipeline applied to our raw map
        ours_out = scale_cam_image(np.maximum(scale_cam_image(ours, (width, height)), 0))
        assert ours_out.shape == peer_out.shape
        assert np.abs(ours_out - peer_out).max() <= 1e-4
        nontrivial += int((peer_raw.max((1, 2)) > 0).all())
    return nontrivial


# --------------------------------------------------------------------------- vs pytorch-grad-cam
@pytest.mark.parametrize("method", METHODS)
@needs_peer
@pytest.mark.parametrize("closed_form", [None, False])
def test_gap_model_equals_peer(method, closed_form):
    model = GapNet().eval()
    x = _image(37, 50, batch=2)
    assert has_gap_linear_head(model, model.features(x))
    assert _compare_with_peer(model, x, method, closed_form) >= 3


@needs_peer
@pytest.mark.parametrize("method", METHODS)
def test_non_gap_head_equals_peer_through_autograd(method):
    model = ConvHeadNet().eval()
    x = _image(33, 41, seed=1, batch=2)
    with torch.no_grad():
        a = model.features(x)
    assert not has_gap_linear_head(model, a)  # auto mode must pick autograd
    assert _compare_with_peer(model, x, method, None) >= 3
    with pytest.raises(ValueError, match="GAP"):
        raw_cams(model, x, [1], method=method, closed_form=True)


@needs_peer
@pytest.mark.parametrize("method", METHODS)
def test_efficientnet_lite0_equals_peer(method, timm_model):
    x = _image(96, 128, seed=2, batch=1)
    assert _compare_with_peer(timm_model, x, method, None) >= 1


# --------------------------------------------------------------------------- closed form
def test_gradcam_is_plain_cam_up_to_positive_constant():
    model = GapNet(classes=6).eval()
    x = _image(40, 52, batch=2)
    with torch.no_grad():
        a = model.features(x)
        plain = torch.einsum("kc,bchw->bkhw", model.head.weight, a).clamp(min=0)
    h, w = a.shape[-2:]
    for closed_form in (True, False):
        ours = raw_cams(model, x, range(1, 7), method="gradcam", closed_form=closed_form)
        assert plain.max() > 0
        torch.testing.assert_close(ours * (h * w), plain, rtol=1e-5, atol=1e-5)
        # hence identical after max-normalisation
        top = ours.flatten(2).amax(2)[..., None, None]
        ptop = plain.flatten(2).amax(2)[..., None, None]
        ok = ptop > 0
        torch.testing.assert_close(torch.where(ok, ours / top, 0), torch.where(ok, plain / ptop, 0))


@pytest.mark.parametrize("method", METHODS)
def test_closed_form_equals_batched_autograd_all_classes(method, timm_model):
    model = GapNet(classes=7).eval()
    with torch.no_grad():  # zero and negative head weights: g == 0 and g < 0 branches
        model.head.weight[2, :5] = 0
        model.head.weight[3] = -model.head.weight[3].abs()
    for m, x in ((model, _image(45, 31, batch=2)), (timm_model, _image(64, 96, seed=4, batch=2))):
        ids = list(range(1, m.head.out_features + 1))
        closed = raw_cams(m, x, ids, method=method, closed_form=True)
        auto = raw_cams(m, x, ids, method=method, closed_form=False)
        default = raw_cams(m, x, ids, method=method)
        assert closed.shape == (2, len(ids)) + tuple(m.features(x).shape[-2:])
        scale = float(auto.abs().max())
        assert scale > 0
        torch.testing.assert_close(closed, auto, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(default, closed, rtol=0, atol=0)
        for i in range(len(ids)):  # batched per-class result == one class at a time
            one = raw_cams(m, x, [ids[i]], method=method, closed_form=False)
            torch.testing.assert_close(one[:, 0], auto[:, i], rtol=1e-5, atol=1e-6 * scale)


def test_autograd_path_works_under_inference_mode():
    model = ConvHeadNet().eval()
    x = _image(30, 30, batch=1)
    ref = raw_cams(model, x, [1, 2], method="gradcam++")
    with torch.inference_mode():
        got = raw_cams(model, x, [1, 2], method="gradcam++")
        res = class_activation_maps(model, x[0], [1, 2], scales=(1.0, 0.5), flip=True, method="gradcam++")
    torch.testing.assert_close(got, ref)
    assert res.high_res.shape == (2, 30, 30)


# --------------------------------------------------------------------------- multi-scale + flip
def _reference_aggregate(model, image, ids, scales, flip, method, normalize):
    """Straightforward per-scale, per-flip loop built on raw_cams."""
    height, width = image.shape[-2:]
    h4, w4 = (height + 3) // 4, (width + 3) // 4
    low = torch.zeros(len(ids), h4, w4)
    high = torch.zeros(len(ids), height, width)
    for s in scales:
        size = (int(round(height * s)), int(round(width * s)))
        xs = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        views = [(xs, False)] + ([(xs.flip(-1), True)] if flip else [])
        for v, flipped in views:
            m = raw_cams(model, v, ids, method=method)
            m = m * (m.shape[-2] * m.shape[-1])  # plain-CAM units
            for target, out in (((h4, w4), low), ((height, width), high)):
                up = F.interpolate(m, size=target, mode="bilinear", align_corners=False)[0]
                out += up.flip(-1) if flipped else up
    res = []
    for t in (low, high):
        t = t.clamp(min=0)
        top = t.flatten(1).amax(1)[:, None, None] if normalize == "per_class" else t.max()
        res.append((t / (top + 1e-5)).numpy())
    return res


@pytest.mark.parametrize("method,normalize,flip", [("gradcam", "per_class", True), ("gradcam++", "global", True),
                                                   ("gradcam", "global", False), ("gradcam++", "per_class", False)])
def test_multiscale_matches_reference_loop(method, normalize, flip):
    model = GapNet(classes=4).eval()
    image = _image(43, 58, seed=5)
    scales = (1.0, 0.5, 0.75, 2.0)
    res = class_activation_maps(model, image, [1, 3, 4], scales=scales, flip=flip, method=method, normalize=normalize)
    low, high = _reference_aggregate(model, image, [1, 3, 4], scales, flip, method, normalize)
    np.testing.assert_allclose(res.cam, low, atol=1e-5)
    np.testing.assert_allclose(res.high_res, high, atol=1e-5)
    np.testing.assert_array_equal(res.keys, [1, 3, 4])


def test_multiscale_gradcam_is_irnet_plain_cam_sum():
    """Grad-CAM on a GAP + linear head, aggregated in plain-CAM units, is IRNet's
    make_cam: sum over scales and flips of ReLU(W_c . A) upsampled, / max."""
    model = GapNet(classes=3).eval()
    image = _image(39, 47, seed=8)
    scales = (1.0, 0.5, 2.0)
    res = class_activation_maps(model, image, [1, 2, 3], scales=scales, flip=True, closed_form=False)
    high = torch.zeros(3, 39, 47)
    for s in scales:
        xs = F.interpolate(image[None], size=scaled_size(39, 47, s), mode="bilinear", align_corners=False)
        with torch.no_grad():
            a = model.features(torch.cat([xs, xs.flip(-1)]))
            cam = torch.einsum("kc,bchw->bkhw", model.head.weight, a).clamp(min=0)
        up = F.interpolate(cam, size=(39, 47), mode="bilinear", align_corners=False)
        high += up[0] + up[1].flip(-1)
    high /= high.flatten(1).amax(1)[:, None, None] + 1e-5
    np.testing.assert_allclose(res.high_res, high.numpy(), atol=1e-5)
    # raw summing (no h*w factor) weights the scales differently
    raw = class_activation_maps(model, image, [1, 2, 3], scales=scales, flip=True, plain_cam_units=False)
    assert np.abs(raw.high_res - res.high_res).max() > 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_flip_equivariant_model_gives_same_maps_with_and_without_flip(method):
    model = MirrorNet().eval()
    image = _image(21, 30, seed=6)
    x = image[None]
    with torch.no_grad():  # the model really is flip-equivariant
        torch.testing.assert_close(model.features(x.flip(-1)), model.features(x).flip(-1), rtol=1e-5, atol=1e-5)
    kw = dict(scales=(1.0, 0.5, 1.5), method=method)
    a = class_activation_maps(model, image, [1, 2, 3], flip=False, **kw)
    b = class_activation_maps(model, image, [1, 2, 3], flip=True, **kw)
    assert a.high_res.max() > 0.99
    np.testing.assert_allclose(a.cam, b.cam, atol=1e-5)
    np.testing.assert_allclose(a.high_res, b.high_res, atol=1e-5)
    # a model that is not flip-equivariant does change (the flag is not a no-op)
    other = GapNet(classes=3).eval()
    c = class_activation_maps(other, image, [1, 2, 3], flip=False, **kw)
    d = class_activation_maps(other, image, [1, 2, 3], flip=True, **kw)
    assert np.abs(c.high_res - d.high_res).max() > 1e-3


def test_normalisation_per_class_and_global():
    model = GapNet(classes=5).eval()
    image = _image(50, 61, seed=7)
    kw = dict(scales=(1.0, 0.5), flip=True, method="gradcam")
    per = class_activation_maps(model, image, [1, 2, 3, 4, 5], normalize="per_class", **kw)
    glo = class_activation_maps(model, image, [1, 2, 3, 4, 5], normalize="global", **kw)
    for maps in (per.cam, per.high_res):
        assert maps.min() >= 0
        np.testing.assert_allclose(maps.reshape(5, -1).max(1), 1.0, atol=1e-4)
    for maps in (glo.cam, glo.high_res):
        assert maps.min() >= 0
        assert abs(float(maps.max()) - 1.0) <= 1e-4
        assert maps.reshape(5, -1).max(1).min() < 0.99  # some class is below the global max
    # same maps up to a per-class factor
    ratio = glo.high_res.reshape(5, -1).max(1)
    np.testing.assert_allclose(per.high_res * ratio[:, None, None], glo.high_res, atol=1e-4)


def test_all_zero_class_map_stays_finite():
    model = GapNet(classes=2).eval()
    with torch.no_grad():
        model.head.weight[1] = -1.0  # A >= 0, so W_c . A < 0 everywhere: ReLU -> 0
    res = class_activation_maps(model, _image(20, 24), [1, 2], scales=(1.0, 0.5), flip=True)
    assert np.isfinite(res.high_res).all() and np.isfinite(res.cam).all()
    assert res.high_res[1].max() == 0 and res.high_res[0].max() > 0.99


@pytest.mark.parametrize("h,w", [(37, 50), (33, 1), (1, 7), (64, 48)])
def test_output_shapes_for_odd_sizes(h, w):
    model = MirrorNet().eval()
    res = class_activation_maps(model, _image(h, w), [2, 3], scales=(1.0, 0.5, 0.75), flip=True)
    assert stride4_size(h, w) == ((h + 3) // 4, (w + 3) // 4)
    assert res.cam.shape == (2,) + stride4_size(h, w)
    assert res.high_res.shape == (2, h, w)
    assert res.cam.dtype == np.float32 and res.high_res.dtype == np.float32
    assert res.keys.dtype == np.int64
    assert res.image_size == (h, w)


def test_scaled_size_rounding():
    assert scaled_size(213, 320, 0.75) == (160, 240)
    assert scaled_size(37, 50, 0.5) == (18, 25)  # round(18.5) -> 18 (Python rounds half to even)
    assert scaled_size(3, 3, 0.1) == (1, 1)


def test_no_classes_gives_empty_maps_without_running_the_model():
    class Exploding(GapNet):
        def features(self, x):
            raise AssertionError("no forward needed for K = 0")

    res = class_activation_maps(Exploding(), _image(37, 50), [], scales=(1.0, 2.0), flip=True)
    assert res.keys.shape == (0,)
    assert res.cam.shape == (0, 10, 13)
    assert res.high_res.shape == (0, 37, 50)
    back = CamResult.from_npz(res.to_npz_dict())
    assert back.cam.shape == (0, 10, 13) and back.high_res.shape == (0, 37, 50)
    assert raw_cams(GapNet(), _image(16, 16, batch=1), []).shape[:2] == (1, 0)


# --------------------------------------------------------------------------- results, classes
def test_npz_round_trip(tmp_path):
    model = GapNet().eval()
    res = class_activation_maps(model, _image(29, 35), [2, 5], scales=(1.0, 0.5), flip=True)
    save_npz(tmp_path / "x.npz", **res.to_npz_dict())
    back = CamResult.from_npz(tmp_path / "x.npz")
    assert back.cam.dtype == np.float32 and back.high_res.dtype == np.float32
    np.testing.assert_array_equal(back.keys, [2, 5])
    assert back.image_size == (29, 35) and back.normalize == "per_class"
    # the stored per-scale maps give the same maps, bit for bit
    assert np.array_equal(back.high_res, res.high_res) and np.array_equal(back.cam, res.cam)
    with np.load(tmp_path / "x.npz") as z:
        np.testing.assert_array_equal(CamResult.from_npz(z).keys, [2, 5])
        assert sorted(z.files) == ["image_size", "keys", "per_class", "scale0", "scale1"]
        # GapNet's features are at stride 4: scale 1 -> 8 x 9 cells, scale 0.5 (15 x 18 pixels) -> 4 x 5
        assert z["scale0"].shape == (2, 8, 9) and z["scale1"].shape == (2, 4, 5)


def test_maps_made_from_the_scale_maps_are_irnets_sum_of_upsampled_maps():
    """cam / high_res against a direct numpy bilinear upsampling (align_corners=False) of two known maps."""
    a = np.array([[[0.0, 2.0], [4.0, 6.0]]], np.float32)  # (1, 2, 2)
    b = np.array([[[-8.0]]], np.float32)  # (1, 1, 1): a constant everywhere after upsampling

    def up(m, size):  # half-pixel centres, edge clamped
        out = np.zeros(size)
        for y in range(size[0]):
            for x in range(size[1]):
                sy = min(max((y + 0.5) * m.shape[0] / size[0] - 0.5, 0), m.shape[0] - 1)
                sx = min(max((x + 0.5) * m.shape[1] / size[1] - 0.5, 0), m.shape[1] - 1)
                y0, x0 = int(sy), int(sx)
                y1, x1 = min(y0 + 1, m.shape[0] - 1), min(x0 + 1, m.shape[1] - 1)
                fy, fx = sy - y0, sx - x0
                out[y, x] = ((1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1]) +
                             fy * ((1 - fx) * m[y1, x0] + fx * m[y1, x1]))
        return out

    res = CamResult([3], [a, b], (7, 5))
    for size, got in (((2, 2), res.cam), ((7, 5), res.high_res)):
        total = np.maximum(up(a[0], size) + up(b[0], size), 0)
        np.testing.assert_allclose(got[0], total / (total.max() + 1e-5), rtol=1e-6, atol=1e-6)
    assert res.high_res.max() < 1 and res.high_res.min() == 0  # ReLU kept the negative corner at 0


def test_a_cam_file_of_an_older_format_is_one_line(tmp_path):
    save_npz(tmp_path / "old.npz", keys=np.array([1]), cam=np.zeros((1, 2, 2), np.float16),
             high_res=np.zeros((1, 5, 5), np.float16))
    with pytest.raises(FileError) as e:
        CamResult.from_npz(tmp_path / "old.npz")
    assert str(e.value) == (f"{tmp_path / 'old.npz'}: CAM file is not in this version's format (keys, image_size, "
                            "per_class, scale0, ...); rerun the cams stage (--force)")


def test_head_class_ids_map_classes_to_head_outputs():
    model = GapNet(classes=3).eval()
    image = _image(24, 28)
    mapped = class_activation_maps(model, image, [7, 2], head_class_ids=[2, 5, 7])
    plain = class_activation_maps(model, image, [3, 1])
    np.testing.assert_array_equal(mapped.keys, [7, 2])
    np.testing.assert_array_equal(mapped.high_res, plain.high_res)
    assert head_indices([7, 2], 3, [2, 5, 7]) == [2, 0]
    with pytest.raises(ValueError, match="not predicted"):
        class_activation_maps(model, image, [3], head_class_ids=[2, 5, 7])
    with pytest.raises(ValueError, match="out of range"):
        class_activation_maps(model, image, [0])
    with pytest.raises(ValueError, match="duplicates"):
        class_activation_maps(model, image, [1, 1])


def test_model_mode_is_restored_and_eval_used():
    model = GapNet().train()
    image = _image(24, 28)
    res_train = class_activation_maps(model, image, [1, 2], flip=True)
    assert model.training
    res_eval = class_activation_maps(model.eval(), image, [1, 2], flip=True)
    np.testing.assert_array_equal(res_train.high_res, res_eval.high_res)


def test_select_classes():
    labels = np.array([0, 1, 0, 1, 0], np.float32)
    assert select_classes(labels, "labels") == [2, 4]
    assert select_classes(torch.tensor(labels), "labels", head_class_ids=[1, 2, 3, 5]) == [2]
    logits = torch.tensor([-3.0, 0.5, -1.0, 2.0])
    assert select_classes(logits, "predicted", 0.5) == [2, 4]
    assert select_classes(logits, "predicted", 0.9) == [4]  # none passes: argmax
    assert select_classes(logits, "predicted", 0.5, head_class_ids=[1, 3, 4, 6]) == [3, 6]
    assert select_classes(np.zeros(5), "labels") == []
    assert select_classes(np.zeros(5), "labels", logits=logits) == [2, 4]  # no labels: predicted
    with pytest.raises(ValueError):
        select_classes(labels, "bogus")


def _lite0_classifier():
    from wsss_core.config import ClassifierConfig
    from wsss_core.models import build_classifier

    torch.manual_seed(0)
    return build_classifier(ClassifierConfig(weights="random"), 4).eval()


def test_cams_at_a_chosen_layer_equal_the_peer():
    """Grad-CAM / Grad-CAM++ at an intermediate backbone layer (autograd path)
    equal pytorch-grad-cam's with that layer as the target."""
    model = _lite0_classifier()
    layer = model.backbone.layer_names[-3]
    view = model.at_layer(layer)
    x = _image(64, 80, batch=1)
    with torch.no_grad():
        assert torch.allclose(view(x), model(x), atol=1e-5)  # same network, split differently
    for method in ("gradcam", "gradcam++"):
        assert _compare_with_peer(view, x, method, closed_form=None) > 0


@pytest.mark.parametrize("head", ["classifier", "recam"])
def test_cam_views_leave_the_model_in_its_mode(head):
    """A view of an eval-mode classifier (an earlier layer, or ReCAM's head) is in
    eval mode too, so computing CAMs with it does not switch the model's batch
    norms to training (which would change every later forward)."""
    from wsss_core.config import ClassifierConfig
    from wsss_core.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(weights="random", recam_weight=1.0), 4).eval()
    x = _image(64, 80, batch=1)
    with torch.no_grad():
        before = model(x)
    layer = model.backbone.layer_names[-3] if head == "classifier" else None
    view = model.cam_model(layer, head)
    assert not view.training
    class_activation_maps(view, x[0], [1, 3], scales=(1.0,), flip=True, method="gradcam++")
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_layer_choice_errors_and_default():
    from wsss_core.config import ConfigError

    model = _lite0_classifier()
    assert model.at_layer(None) is model and model.at_layer(model.backbone.layer_names[-1]) is model
    with pytest.raises(ConfigError, match=r"cams\.layer: 'nope' is not a layer of efficientnet_lite0; choose one of"):
        model.at_layer("nope")


# --------------------------------------------------------------------------- the seed's Grad-CAM++
def _seed_gradcampp_one_class(model: nn.Module, x: torch.Tensor, head_index: int) -> torch.Tensor:
    """The NoPeopleAllowed seed's CamGradPlusPlus, written from its description, one class at a
    time: backpropagate exp(score) to A, g = d exp(score)/dA,
    alpha = g^2 / (2 g^2 + sum_ij A g^3 + 1e-5), w = sum_ij alpha ReLU(g), map = ReLU(sum_k w A)."""
    with torch.no_grad():
        a = model.features(x).double()
    a.requires_grad_(True)
    score = model.logits_from_features(a)[:, head_index]
    (g,) = torch.autograd.grad(torch.exp(score).sum(), a)
    with torch.no_grad():
        sum_a = a.sum((2, 3), keepdim=True)
        alpha = g ** 2 / (2 * g ** 2 + sum_a * g ** 3 + 1e-5)
        w = (alpha * g.clamp(min=0)).sum((2, 3), keepdim=True)
        return (w * a).sum(1).clamp(min=0)  # (B, h, w)


@pytest.mark.parametrize("net, closed_form", [(GapNet, None), (GapNet, False), (ConvHeadNet, False)])
def test_seed_gradcampp_equals_its_formula_class_by_class(net, closed_form):
    model = net().eval()
    with torch.no_grad():
        model.head.weight.mul_(0.05)  # logits of a trained classifier's size: exp(score)^3 stays finite
    x = _image(37, 45, seed=4, batch=2)
    classes = [1, 3, 4, 5]
    got = raw_cams(model, x, classes, method="gradcam++exp", closed_form=closed_form)  # float32 features
    for j, k in enumerate(classes):
        ref = _seed_gradcampp_one_class(model.double(), x.double(), k - 1)
        model.float()
        assert float(ref.max()) > 0
        assert torch.allclose(got[:, j].double(), ref, rtol=1e-4, atol=1e-5 * float(ref.max())), k


def test_seed_gradcampp_differs_from_the_peers():
    """exp(score) and eps 1e-5 change the weights: it is its own method, not an alias."""
    model = GapNet().eval()
    x = _image(37, 45, seed=5)[None]
    a, b = (raw_cams(model, x, [2], method=m)[0, 0] for m in ("gradcam++", "gradcam++exp"))
    a, b = a / a.max(), b / b.max()
    assert (a - b).abs().max() > 1e-3


def test_seed_gradcampp_stays_finite_for_huge_scores():
    model = ConvHeadNet().eval()  # logits of several hundred: exp(score)^3 overflows float64
    maps = raw_cams(model, _image(37, 45, seed=4, batch=2), [1, 3, 4, 5], method="gradcam++exp")
    assert torch.isfinite(maps).all() and (maps.amax((2, 3)) > 0).all()


def test_a_cam_file_of_a_500x375_photo_is_small(tmp_path):
    """The msrc preset's CAMs (EfficientNet-lite0 at output stride 16, scales 1.25 and 1.5, flip) of a
    500x375 photo with two classes: 2 x (40x30 + 47x36) float32 cells = 23,136 bytes of maps, under the
    50 KB per image the LID scale asks for (the full-size float16 map alone was 750 KB)."""
    from wsss_core.config import ClassifierConfig
    from wsss_core.models.classifier import build_classifier

    model = build_classifier(ClassifierConfig(backbone="efficientnet_lite0", weights="random", output_stride=16), 20)
    x = torch.randn(3, 375, 500, generator=torch.Generator().manual_seed(0))
    res = class_activation_maps(model.eval(), x, [3, 15], scales=(1.25, 1.5), flip=True, method="gradcam++")
    path = save_npz(tmp_path / "c.npz", **res.to_npz_dict())
    assert [m.shape for m in res.scale_maps] == [(2, 30, 40), (2, 36, 47)]
    assert sum(m.nbytes for m in res.scale_maps) == 23_136
    assert path.stat().st_size < 23_136 + 1_500 < 50_000  # six small arrays' npz headers on top
    assert res.high_res.shape == (2, 375, 500) and res.cam.shape == (2, 94, 125)
