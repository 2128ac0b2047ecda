"""CAM files: 8-bit storage (`cams.storage: uint8`) against hand-computed codes,
its round trip, its error bound, its size for LID's preset, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from wsss_core.cam import class_activation_maps, scaled_size
from wsss_core.cam_maps import CamResult, decode_uint8, encode_uint8
from wsss_core.store import FileError, save_npz

from conftest import REPO
from test_cam import GapNet, _image


def test_uint8_codes_of_a_hand_made_map():
    # class 1: -1 .. 1.55 in 255 steps of 0.01; class 2: constant (step 0, every code 0)
    m = np.array([[[-1.0, 0.004, 1.55, 0.2449]], [[3.0, 3.0, 3.0, 3.0]]], np.float32)
    codes, ranges = encode_uint8(m)
    assert codes.dtype == np.uint8 and ranges.dtype == np.float32
    assert codes[0, 0].tolist() == [0, 100, 255, 124]  # 1.004 / 0.01 = 100.4 -> 100; 1.2449 / 0.01 -> 124
    assert codes[1, 0].tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(ranges, [[-1.0, 0.01], [3.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(decode_uint8(codes, ranges), [[[-1.0, 0.0, 1.55, 0.24]], [[3.0] * 4]], atol=1e-6)


def test_a_uint8_file_gives_back_the_stored_result_bit_for_bit(tmp_path):
    res = class_activation_maps(GapNet().eval(), _image(29, 35), [2, 5], scales=(1.0, 0.5), flip=True)
    small = res.stored("uint8")
    assert res.storage == "float32" and small.storage == "uint8" and res.stored("float32") is res
    assert small.stored("float32").storage == "float32"
    # every value within half a step of its float32 value, per class and scale
    for m, q in zip(res.scale_maps, small.scale_maps):
        step = (m.max((1, 2)) - m.min((1, 2))) / 255
        assert (np.abs(q - m).max((1, 2)) <= step / 2 * (1 + 1e-4) + 1e-7).all()
        assert not np.array_equal(q, m)  # it did round
    save_npz(tmp_path / "f.npz", **res.to_npz_dict())
    save_npz(tmp_path / "q.npz", **small.to_npz_dict())
    back = CamResult.from_npz(tmp_path / "q.npz")
    assert back.storage == "uint8" and back.keys.tolist() == [2, 5] and back.image_size == (29, 35)
    assert np.array_equal(back.cam, small.cam) and np.array_equal(back.high_res, small.high_res)
    with np.load(tmp_path / "q.npz") as z:
        assert sorted(z.files) == ["image_size", "keys", "per_class", "range0", "range1", "scale0", "scale1"]
        assert z["scale0"].dtype == np.uint8 and z["range0"].shape == (2, 2)
        # one byte a cell instead of four
        assert z["scale0"].nbytes + z["scale1"].nbytes == sum(m.nbytes for m in res.scale_maps) // 4
    # the maps the stages read move by little: the full-size maps within 1 % of their range
    assert np.abs(back.high_res - res.high_res).max() < 0.01


def test_the_lid_presets_cam_file_of_a_500x375_photo_fits_in_50_kb(tmp_path):
    """VGG16 at output stride 8 with scales 1.0, 0.5, 0.75 and 2.0 (params/lid2020.yaml), two classes:
    the real backbone's feature shapes (on the meta device: shapes, no arithmetic) give 16,800 cells per
    class, so 134 KB of maps per file in float32 and 34 KB in uint8."""
    from wsss_core.config import ClassifierConfig
    from wsss_core.models.classifier import build_classifier

    preset = yaml.safe_load((REPO / "params" / "lid2020.yaml").read_text())
    c = preset["classifier"]
    assert preset["cams"]["storage"] == "uint8"
    model = build_classifier(ClassifierConfig(backbone=c["backbone"], weights="random",
                                              output_stride=c["output_stride"]), 200).to("meta")
    shapes = [tuple(model.features(torch.empty(1, 3, *scaled_size(375, 500, s), device="meta")).shape[-2:])
              for s in preset["cams"]["scales"]]
    assert sum(h * w for h, w in shapes) == 16_800
    rng = np.random.default_rng(0)
    res = CamResult([3, 15], [rng.normal(size=(2, *s)).astype(np.float32) for s in shapes], (375, 500))
    f = save_npz(tmp_path / "f.npz", **res.to_npz_dict()).stat().st_size
    q = save_npz(tmp_path / "q.npz", **res.stored("uint8").to_npz_dict()).stat().st_size
    assert 134_400 < f < 134_400 + 2_000 and 33_600 < q < 33_600 + 3_000 < 50_000


def test_bad_uint8_cam_files_are_one_line(tmp_path):
    codes = np.zeros((2, 3, 4), np.uint8)
    head = {"keys": np.array([1, 2]), "image_size": np.array([9, 12]), "per_class": np.array(True)}
    for name, extra, why in (
            ("no_range", {"scale0": codes}, "uint8 scale maps need to be (K, h, w), each with a (K, 2) range<i>"),
            ("bad_range", {"scale0": codes, "range0": np.zeros((3, 2), np.float32)},
             "uint8 scale maps need to be (K, h, w), each with a (K, 2) range<i>"),
            ("flat_codes", {"scale0": codes[:, 0], "range0": np.zeros((2, 2), np.float32)},
             "uint8 scale maps need to be (K, h, w), each with a (K, 2) range<i>"),
            ("nan_range", {"scale0": codes, "range0": np.array([[0, 1], [np.nan, 1]], np.float32)},
             "the ranges of uint8 scale maps must be finite float32 (lo, step >= 0)"),
            ("negative_step", {"scale0": codes, "range0": np.array([[0, 1], [0, -1]], np.float32)},
             "the ranges of uint8 scale maps must be finite float32 (lo, step >= 0)"),
            ("mixed", {"scale0": codes, "range0": np.zeros((2, 2), np.float32),
                       "scale1": codes.astype(np.float32)},
             "scale maps must be all float32 or all uint8, got ['uint8', 'float32']")):
        path = save_npz(tmp_path / f"{name}.npz", **head, **extra)
        with pytest.raises(FileError) as e:
            CamResult.from_npz(path)
        assert str(e.value) == f"{path}: CAM file: {why}; rerun the cams stage (--force)"


def test_an_unknown_storage_and_non_finite_maps_are_refused():
    res = CamResult([1], [np.zeros((1, 2, 2), np.float32)], (8, 8))
    with pytest.raises(ValueError, match="storage must be one of float32, uint8, got 'float16'"):
        res.stored("float16")
    with pytest.raises(ValueError, match=r"expected finite \(K, h, w\) maps"):
        encode_uint8(np.array([[[0.0, np.nan]]], np.float32))


@pytest.mark.slow
def test_the_cam_storage_benchmark_scores_the_run_as_its_stages_did(ci_full_run):
    """benchmarks/cam_storage.py on the ci run: its "run" figures are the stages' own (file sizes, the
    CRF-refined pseudo masks' mIoU), and the uint8 CAMs change the pseudo masks by few pixels."""
    import re
    import subprocess
    import sys

    from wsss_core.artifacts import CAMS, read_kept_ids

    cfg, run = ci_full_run
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cam_storage.py"), "--config",
                          str(REPO / "params" / "ci.yaml"), "--run-dir", str(run.root), "--against", "uint8"],
                         capture_output=True, text=True, check=True).stdout
    ids = read_kept_ids(run)
    pixels = int(re.search(r"images: (\d+), pixels: (\d+)", out)[2])
    assert re.search(r"images: (\d+)", out)[1] == str(len(ids))
    per_image = sum(CAMS.path(run, i).stat().st_size for i in ids) / len(ids)
    assert f"run (float32) {per_image:,.0f}," in out
    m = re.search(r"pseudo masks \(CRF-refined\): (\d+) of (\d+) pixels differ; mIoU run ([\d.]+), uint8 ([\d.]+)",
                  out)
    assert m, out
    assert int(m[2]) == pixels and int(m[1]) < 0.01 * pixels
    assert float(m[3]) == round(100 * run.manifest("pseudo_masks")["metrics"]["miou"], 2)
