"""Test-time augmentation and `wsss predict` on a folder of new images."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_core import cli, stages
from wsss_core.config import CrfConfig
from wsss_core.crf import refined_prediction
from wsss_core.models.segmenter import build_segmenter
from wsss_core.predict import segment, tta_logits, upsampled_argmax, working_image
from wsss_core.predict_folder import predict_folder
from wsss_core.models.segmenter import pixel_loss


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_segmenter("efficientnet_lite0", 5, 16, (6, 12, 18), weights="imagenet").eval()


def test_tta_on_a_flip_symmetric_image_is_flip_symmetric(net):
    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, (37, 25, 3), dtype=np.uint8)
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # 37 x 50, mirror-symmetric
    logits = tta_logits(net, image, scales=(0.5, 1.0, 1.5), flip=True)
    assert torch.allclose(logits, logits.flip(-1), atol=1e-5)
    plain = tta_logits(net, image, scales=(1.0,), flip=False)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)  # the network alone is not symmetric


def test_tta_averages_what_it_should(net):
    image = np.random.default_rng(1).integers(0, 255, (33, 41, 3), dtype=np.uint8)
    one = tta_logits(net, image, (1.0,), flip=False)
    flipped = tta_logits(net, np.ascontiguousarray(image[:, ::-1]), (1.0,), flip=False).flip(-1)
    assert torch.allclose(tta_logits(net, image, (1.0,), flip=True), (one + flipped) / 2, atol=1e-5)


def test_tta_logits_at_scales_other_than_one_by_hand(net):
    """The TTA recipe computed here with torch alone, at scales 0.5 and 1.5 of an odd-sized image: each scaled
    image and its mirror through the net, the mirror's logits flipped back, all four resized to the input size
    (bilinear, half-pixel centres) and averaged."""
    h, w = 37, 29
    image = np.random.default_rng(7).integers(0, 255, (h, w, 3), dtype=np.uint8)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in net.normalization)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
    sizes = {0.5: (18, 14), 1.5: (56, 44)}  # round(37 s) x round(29 s), Python's round: halves go to even
    maps = []
    with torch.no_grad():
        for s, size in sizes.items():
            xs = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
            plain = net(xs)
            mirrored = net(xs.flip(-1)).flip(-1)
            assert plain.shape[-2:] == mirrored.shape[-2:] == size
            assert (plain - mirrored).abs().max() > 1e-2  # the flip matters: forgetting to undo it would show
            for logits in (plain, mirrored):
                maps.append(torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear",
                                                            align_corners=False)[0])
    expected = sum(maps) / 4
    got = tta_logits(net, image, scales=(0.5, 1.5), flip=True)
    assert got.shape == (5, h, w)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())
    assert expected.abs().max() > 0.1  # a wrong divisor would not hide in near-zero logits


def test_tta_logits_in_bfloat16_are_the_net_under_bfloat16_autocast(net):
    """`precision: bfloat16`: each pass runs under bfloat16 autocast (computed here by hand: the image and its
    mirror through the net under autocast, the mirror flipped back, averaged in float32); it differs from the
    float32 logits by bfloat16 rounding only, and gives the same argmax on nearly every pixel."""
    image = np.random.default_rng(3).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in net.normalization)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.cat([x, x.flip(-1)])).float()
    expected = (out[0] + out[1].flip(-1)) / 2
    got = tta_logits(net, image, (1.0,), flip=True, precision="bfloat16")
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())
    full = tta_logits(net, image, (1.0,), flip=True)
    gap = float((got - full).abs().max())
    assert 1e-3 < gap < 0.1 * float(full.abs().max()), gap  # bfloat16 rounding: present, and small
    assert (got.argmax(0) == full.argmax(0)).float().mean() > 0.95


@pytest.mark.parametrize("h, w", [(1, 5), (7, 3), (33, 47), (65, 17)])
def test_odd_sizes_at_any_scale(net, h, w):
    image = np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8)
    labels = segment(net, image, scales=(0.5, 0.75, 1.0, 1.25, 2.0), flip=True)
    assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < 5


def test_the_upsampled_argmax_by_hand_and_against_torch():
    """Strip by strip, as one F.interpolate of the whole map would give it (half-pixel centres)."""
    # 2 classes, 1 x 2 logits -> 1 x 4: columns at source x = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    logits = torch.tensor([[[0.0, 1.0]], [[0.6, 0.6]]])
    # class 0 at x: 0, 0.25, 0.75, 1  against 0.6 everywhere
    assert upsampled_argmax(logits, (1, 4)).tolist() == [[1, 1, 0, 0]]
    gen = torch.Generator().manual_seed(0)
    for (c, h, w), size, rows in [((5, 7, 9), (50, 31), 8), ((3, 13, 4), (13, 4), 5), ((4, 6, 6), (101, 77), 256)]:
        small = torch.randn(c, h, w, generator=gen)
        want = torch.nn.functional.interpolate(small[None], size=size, mode="bilinear", align_corners=False)[0]
        assert np.array_equal(upsampled_argmax(small, size, rows), want.argmax(0).numpy())


def test_a_large_image_is_segmented_at_max_side(net):
    """The network sees the image at the working size; the mask comes back at full size."""
    image = np.random.default_rng(3).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    seen = []
    hook = net.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    try:
        labels = segment(net, image, (1.0, 0.5), flip=False, max_side=100)
    finally:
        hook.remove()
    assert seen == [(100, 67), (50, 34)]  # 200 * 100 / 300 = 66.7; then round(33.5) = 34 (halves to even: 34)
    small = working_image(image, 100)
    assert labels.shape == (300, 200)
    assert np.array_equal(labels, upsampled_argmax(tta_logits(net, small, (1.0, 0.5), flip=False), (300, 200)))
    assert np.array_equal(segment(net, small, (1.0,), False, max_side=100),
                          segment(net, small, (1.0,), False))  # at or under max_side: untouched
    # the working image is the photo made smaller as an image viewer would (PIL's antialiased bilinear)
    ref = np.asarray(Image.fromarray(image).resize((67, 100), Image.BILINEAR))
    assert np.abs(small.astype(int) - ref).max() <= 2
    # with a CRF: refined at the working size (memory bounded by it), then each full-size pixel takes the label
    # of the working-size pixel whose area holds its centre
    crf = CrfConfig(gt_prob=0.7)
    coarse = tta_logits(net, small, (1.0, 0.5), flip=False).argmax(0).to(torch.uint8).numpy()
    at_working = refined_prediction(small, coarse, crf)
    assert (at_working != coarse).any() and set(np.unique(at_working)) <= set(np.unique(coarse))
    rows = ((np.arange(300) + 0.5) * 100 / 300).astype(int)
    cols = ((np.arange(200) + 0.5) * 67 / 200).astype(int)
    np.testing.assert_array_equal(segment(net, image, (1.0, 0.5), flip=False, max_side=100, crf=crf),
                                  at_working[rows][:, cols])


def test_the_pixel_loss_ignores_255():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    y = torch.randint(0, 4, (2, 6, 6), generator=g)
    y[:, :2] = 255
    base = pixel_loss(Fixed(logits), (None, y, None))
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 4, 2, 6, generator=g) * 10  # only where the labels are 255
    assert pixel_loss(Fixed(changed), (None, y, None)) == pytest.approx(float(base), abs=1e-6)
    known = logits.clone()
    known[:, 0, 3] += 5.0  # one class at known pixels
    assert abs(float(pixel_loss(Fixed(known), (None, y, None))) - float(base)) > 1e-3
    expected = torch.nn.functional.cross_entropy(logits[:, :, 2:], y[:, 2:])
    assert float(base) == pytest.approx(float(expected), abs=1e-6)


# --------------------------------------------------------------------------- wsss predict
def new_images(folder, bad=False):
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (61, 47), "b": (120, 97), "c": (33, 80)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 51), dtype=np.uint8)).save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 66, 3), dtype=np.uint8)).save(folder / "d.png")
    if bad:
        (folder / "notes.txt").write_text("not an image")
        jpg = (folder / "a.jpg").read_bytes()
        (folder / "broken.jpg").write_bytes(jpg[: len(jpg) // 3])
    return {**sizes, "gray": (50, 51), "d": (40, 66)}


def test_predict_a_folder_of_new_images(ci_full_run, tmp_path):
    cfg, run = ci_full_run
    sizes = new_images(tmp_path / "in")
    out = tmp_path / "out"
    written = predict_folder(run.root, tmp_path / "in", out)
    assert sorted(p.name for p in written) == sorted(f"{k}.png" for k in sizes)
    n = len(stages.dataset(cfg).classes)
    for name, (h, w) in sizes.items():
        labels = np.array(Image.open(out / f"{name}.png"))
        assert labels.shape == (h, w) and labels.max() < n
    # the same images without TTA differ only where flips disagree; no overwrite without asking
    assert cli.main(["predict", "--run", str(run.root), "--images", str(tmp_path / "in"), "--out", str(out),
                     "--no-tta"]) == 2
    assert cli.main(["predict", "--run", str(run.root), "--images", str(tmp_path / "in"), "--out", str(out),
                     "--no-tta", "--overwrite"]) == 0


def test_predict_refuses_bad_folders_before_any_work(ci_full_run, ci_run, tmp_path, capsys):
    _, run = ci_full_run
    _, unfinished = ci_run
    new_images(tmp_path / "in", bad=True)
    (tmp_path / "empty").mkdir()
    cases = [
        (["--run", str(unfinished.root), "--images", str(tmp_path / "in")], "the segmentation stage has not finished"),
        (["--run", str(run.root), "--images", str(tmp_path / "empty")], "the folder has no files"),
        (["--run", str(run.root), "--images", str(tmp_path / "nope")], "image folder not found"),
        (["--run", str(run.root), "--images", str(tmp_path / "in")], "2 unreadable image file(s): broken.jpg"),
        (["--run", str(tmp_path), "--images", str(tmp_path / "in")], "not a run folder"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert cli.main(["predict", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "predict", "--run", str(run.root), "--images",
                        str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--skip-bad"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png", "d.png", "gray.png"]
    assert "skipped 2 unreadable file(s): broken.jpg" in r.stdout and "notes.txt (format .txt not supported" in r.stdout


def test_predict_writes_masks_as_the_image_is_displayed(ci_full_run, tmp_path):
    """A phone JPEG (stored 40x24, EXIF Orientation 6: shown 24 wide x 40 high) gets a mask of the displayed
    image: its size, and the same labels as the displayed pixels saved without any orientation tag."""
    _, run = ci_full_run
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    stored[:12, :20] = (255, 0, 0)  # an asymmetric pattern, so a wrong turn shows in the labels too
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "phone.jpg", exif=exif)
    with Image.open(folder / "phone.jpg") as im:
        assert im.size == (40, 24)
        decoded = np.array(im.convert("RGB"))  # the stored pixels, as decoded
    Image.fromarray(np.ascontiguousarray(np.rot90(decoded, -1))).save(folder / "shown.png")  # turned clockwise
    out = tmp_path / "out"
    predict_folder(run.root, folder, out, tta=False)
    phone = np.array(Image.open(out / "phone.png"))
    assert phone.shape == (40, 24)  # height x width as displayed
    np.testing.assert_array_equal(phone, np.array(Image.open(out / "shown.png")))


def test_predictions_refined_by_a_dense_crf(ci_full_run, tmp_path):
    """`predict.crf_gt_prob`: only predict is redone; each stored prediction is the TTA argmax of the first
    run, refined by the label-unary CRF over the classes it holds (computed here with `refined_mask`); the
    scores are those of the stored files; `wsss predict` on new images refines them the same way."""
    import dataclasses
    import shutil

    from conftest import REPO
    from wsss_core.artifacts import model_path
    from wsss_core.config import load_config
    from wsss_core.crf import refined_mask
    from wsss_core.metrics import ConfusionMatrix
    from wsss_core.models.segmenter import load_segmenter
    from wsss_core.stages.predict import prediction_artifact

    _, first = ci_full_run
    shutil.copytree(first.root, tmp_path / "run")
    cfg = load_config(REPO / "params" / "ci.yaml", {"predict.crf_gt_prob": 0.9})
    run = stages.open_run(tmp_path / "run", cfg)
    assert run.is_done("bound") and not run.is_done("predict")
    m = stages.run_stage("predict", cfg, run).metrics
    assert m["crf_gt_prob"] == 0.9 and run.manifest("segmentation") == first.manifest("segmentation")
    ds = stages.dataset(cfg)
    images, masks = ds.labelled("val"), ds.masks("val")
    art = prediction_artifact(cfg, "val")
    net = load_segmenter(model_path(run, "segmentation"))
    crf = dataclasses.replace(cfg.crf, gt_prob=0.9)
    cm, changed, checked = ConfusionMatrix(ds.num_classes), 0, []
    for sid in ds.ids("val"):
        cm.update(art.read(run, sid), masks.mask(sid))
        raw = art.read(first, sid)
        keys = np.unique(raw)[np.unique(raw) > 0]
        if keys.size and len(checked) < 3:
            image = images.image(sid)
            np.testing.assert_array_equal(
                raw, segment(net, image, cfg.predict.tta_scales, cfg.predict.tta_flip, "cpu", cfg.predict.max_side))
            expected = refined_mask(image, raw, keys, crf)
            np.testing.assert_array_equal(art.read(run, sid), expected)
            changed += int((expected != raw).sum())
            checked.append(sid)
    assert len(checked) == 3 and changed > 0  # the CRF moved some pixels
    assert m["val_miou"] == pytest.approx(100 * cm.miou(), abs=0.005)
    assert m["val_miou"] != first.manifest("predict")["metrics"]["val_miou"]
    folder = tmp_path / "in"
    folder.mkdir()
    for sid in checked:
        shutil.copy(images.image_path(sid), folder)
    out = tmp_path / "out"
    predict_folder(run.root, folder, out)
    for sid in checked:
        np.testing.assert_array_equal(np.array(Image.open(out / f"{images.image_path(sid).stem}.png")),
                                      art.read(run, sid))


def test_predictions_in_bfloat16(ci_full_run, tmp_path):
    """`predict.precision: bfloat16`: only predict is redone; each stored prediction is `segment` under bfloat16
    autocast, and the scores are those of the stored files; `wsss predict` on new images uses it too."""
    import shutil

    from conftest import REPO
    from wsss_core.artifacts import model_path
    from wsss_core.config import load_config
    from wsss_core.metrics import ConfusionMatrix
    from wsss_core.models.segmenter import load_segmenter
    from wsss_core.stages.predict import prediction_artifact

    _, first = ci_full_run
    shutil.copytree(first.root, tmp_path / "run")
    cfg = load_config(REPO / "params" / "ci.yaml", {"predict.precision": "bfloat16"})
    run = stages.open_run(tmp_path / "run", cfg)
    assert run.is_done("bound") and not run.is_done("predict")
    m = stages.run_stage("predict", cfg, run).metrics
    assert m["precision"] == "bfloat16" and run.manifest("segmentation") == first.manifest("segmentation")
    ds = stages.dataset(cfg)
    images, masks = ds.labelled("val"), ds.masks("val")
    art = prediction_artifact(cfg, "val")
    net = load_segmenter(model_path(run, "segmentation"))
    p = cfg.predict
    cm, sids = ConfusionMatrix(ds.num_classes), ds.ids("val")
    for sid in sids:
        cm.update(art.read(run, sid), masks.mask(sid))
    for sid in sids[:3]:
        image = images.image(sid)
        np.testing.assert_array_equal(art.read(run, sid), segment(net, image, p.tta_scales, p.tta_flip, "cpu",
                                                                  p.max_side, None, "bfloat16"))
    assert m["val_miou"] == pytest.approx(100 * cm.miou(), abs=0.005)
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    shutil.copy(images.image_path(sids[0]), folder)
    predict_folder(run.root, folder, out)
    np.testing.assert_array_equal(np.array(Image.open(out / f"{images.image_path(sids[0]).stem}.png")),
                                  art.read(run, sids[0]))


def test_predict_with_the_bound_segments_as_the_run_did(ci_full_run, ci_run, tmp_path, capsys):
    """`wsss predict --model bound`: the fully supervised bound, with the run's TTA and CRF, writes the
    very masks the predict stage wrote for it (07_predict/bound/val/); the weak segmenter's differ. A run
    without the bound is refused in one line before any work."""
    import shutil

    from wsss_core.stages.predict import prediction_artifact

    cfg, run = ci_full_run
    ds = stages.dataset(cfg)
    images = ds.labelled("val")
    folder = tmp_path / "in"
    folder.mkdir()
    ids = ds.ids("val")
    for sid in ids:
        shutil.copy(images.image_path(sid), folder)
    out = tmp_path / "bound"
    assert cli.main(["predict", "--run", str(run.root), "--images", str(folder), "--out", str(out),
                     "--model", "bound"]) == 0
    bound, weak = prediction_artifact(cfg, "val", "bound"), prediction_artifact(cfg, "val")
    differs = 0
    for sid in ids:
        got = np.array(Image.open(out / f"{images.image_path(sid).stem}.png"))
        np.testing.assert_array_equal(got, bound.read(run, sid))
        differs += int((got != weak.read(run, sid)).sum())
    assert differs > 0  # the bound is another model than the weak segmenter
    no_bound = tmp_path / "no-bound"
    shutil.copytree(run.root, no_bound)
    shutil.rmtree(no_bound / "06_bound")
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(no_bound), "--images", str(folder), "--out", str(tmp_path / "x"),
                     "--model", "bound"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bound stage has not finished" in err and "segmentation.bound: true" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x").exists()
