"""Boundary net, random-walk pseudo masks, segmenter, its bound and predict on
a finished ci run: files, formats, equality with the dense reference, metrics
recomputed independently."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from wsss_core import stages
from wsss_core.artifacts import BOUNDARY_MAPS, CAMS, PSEUDO_MASKS, WALK_MASKS, model_path, predictions, read_kept_ids
from wsss_core.crf import dense_crf_labels
from wsss_core.metrics import ConfusionMatrix
from wsss_core.affinity import AffinityTargets
from wsss_core.models.boundary import boundary_map, load_boundary
from wsss_core.models.segmenter import load_segmenter
from wsss_core.train import param_checksum

from conftest import REPO
from test_random_walk import dense_random_walk


def test_boundary_stage_saves_a_model_that_reloads(ci_full_run):
    cfg, run = ci_full_run
    m = run.manifest("boundary")["metrics"]
    assert m["epochs"] == cfg.boundary.epochs and np.isfinite(m["loss"])
    assert m["train_images"] == len(read_kept_ids(run))
    model = load_boundary(model_path(run, "boundary"))
    train = stages.dataset(cfg).labelled("train")
    image = train.image(train.ids[0])
    b = boundary_map(model, image, torch.device("cpu"))
    assert b.shape == ((image.shape[0] + 3) // 4, (image.shape[1] + 3) // 4) and 0.0 <= b.min() <= b.max() <= 1.0
    e = m["val_boundary"]
    assert e["thresholds"] == list(cfg.boundary.eval_thresholds) and len(e["f"]) == len(e["thresholds"])
    assert e["best_f"] == max(e["f"])


def test_boundary_stage_with_the_stem_input(ci_full_run, tmp_path):
    """`boundary.stem_input`: only the boundary net is redone, its branch reads five stages (the stem
    first), the saved file says so, and the stages that read its maps go stale."""
    from wsss_core.config import load_config

    _, first = ci_full_run
    shutil.copytree(first.root, tmp_path / "run")
    cfg = load_config(REPO / "params" / "ci.yaml", {"boundary.stem_input": True})
    run = stages.open_run(tmp_path / "run", cfg)
    assert run.is_done("crf") and not run.is_done("boundary")
    stages.run_stage("boundary", cfg, run)
    model = load_boundary(model_path(run, "boundary"))
    assert model.stem_input and [s[0].in_channels for s in model.branch.stages] == [16, 24, 40, 112, 1280]
    assert len(load_boundary(model_path(first, "boundary")).branch.stages) == 4
    assert run.is_done("boundary") and not run.is_done("pseudo_masks")
    assert run.manifest("boundary")["metrics"]["param_checksums"] != \
        first.manifest("boundary")["metrics"]["param_checksums"]


def test_affinity_targets_of_a_label_crop():
    labels = torch.full((8, 8), 255, dtype=torch.int64)
    labels[:, :4] = 0
    labels[:, 4:] = 3
    bg, fg, neg = AffinityTargets(2)(labels)  # stride 4 -> a 2 x 2 map: [[0, 3], [0, 3]]
    # offsets of radius 2: (0, 1), (1, -1), (1, 0), (1, 1)
    assert bg.shape == (4, 2, 2)
    assert bg[2, 0, 0] and not bg[2, 0, 1] and fg[2, 0, 1]  # (1, 0): same column, same class
    assert neg[0, 0, 0] and neg[0, 1, 0] and neg[3, 0, 0] and neg[1, 0, 1]  # across the 0 | 3 edge
    assert int(bg.sum()) == 1 and int(fg.sum()) == 1 and int(neg.sum()) == 4


def upsample_x4(a: np.ndarray) -> np.ndarray:
    """(K, h, w) -> (K, 4h, 4w) bilinear, half-pixel centres (align_corners=False): output pixel o samples the
    input at (o + 0.5) / 4 - 0.5, clamped to >= 0, between its two neighbours (the last one repeated)."""
    def taps(n):
        src = np.maximum((np.arange(4 * n) + 0.5) / 4 - 0.5, 0.0)
        i0 = np.floor(src).astype(np.int64)
        return i0, np.minimum(i0 + 1, n - 1), src - i0

    r0, r1, fr = taps(a.shape[1])
    c0, c1, fc = taps(a.shape[2])
    rows = a[:, r0] * (1 - fr)[:, None] + a[:, r1] * fr[:, None]
    return rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc


def reference_pseudo_mask(rw: np.ndarray, keys, image_size, bg_threshold: float) -> np.ndarray:
    """IRNet's rule, written here from its description: rw upsampled x4, cut to the image, divided by its max,
    a background score bg_threshold before the K class scores, argmax (ties to background), index c -> keys[c-1]."""
    height, width = image_size
    scores = upsample_x4(np.asarray(rw, np.float64))[:, :height, :width]
    if scores.max() > 0:
        scores = scores / scores.max()
    best = np.argmax(np.concatenate([np.full((1, height, width), bg_threshold), scores]), axis=0)
    class_ids = np.asarray(keys, np.int64)
    return np.where(best == 0, 0, class_ids[np.maximum(best - 1, 0)]).astype(np.uint8)


def test_pseudo_masks_are_the_dense_random_walk_refined_by_the_crf(ci_full_run):
    """walk/<id>.png is the dense reference walk's mask; masks/<id>.png is that mask through the label-unary
    dense CRF at pseudo_masks.crf_gt_prob with the crf section's pairwise terms (on local label indices)."""
    cfg, run = ci_full_run
    kept = read_kept_ids(run)
    assert cfg.pseudo_masks.crf_gt_prob == 0.95
    assert PSEUDO_MASKS.ids(run) == BOUNDARY_MAPS.ids(run) == WALK_MASKS.ids(run) == sorted(kept)
    p = cfg.pseudo_masks
    images = stages.dataset(cfg).labelled("train")
    checked = changed = 0
    for sid in kept:
        cam = CAMS.read(run, sid)
        if not len(cam.keys):
            continue
        b = BOUNDARY_MAPS.read(run, sid)
        rw = dense_random_walk(cam.cam.astype(np.float64), b.astype(np.float64), p.radius, p.beta, p.exp_times)
        expected = reference_pseudo_mask(rw, cam.keys, cam.image_size, p.sem_seg_bg_thres)
        walked, stored = WALK_MASKS.read(run, sid), PSEUDO_MASKS.read(run, sid)
        assert walked.shape == stored.shape == cam.image_size
        assert set(np.unique(stored)) <= {0, *cam.keys.tolist()}
        assert (walked == expected).mean() > 0.999, sid  # float32 vs float64 may flip a tie-level pixel
        lut = np.array([0, *cam.keys.tolist()])
        assert np.all(np.diff(lut) > 0)  # class ids ascending (select_classes), so searchsorted inverts lut
        crf = cfg.crf.__class__(**{**cfg.crf.__dict__, "gt_prob": p.crf_gt_prob})
        refined = lut[dense_crf_labels(images.image(sid), np.searchsorted(lut, walked),
                                       lut.size, crf)]
        np.testing.assert_array_equal(stored, refined)
        changed += int((stored != walked).any())
        checked += 1
        if checked == 3:
            break
    assert checked == 3 and changed >= 1  # the CRF moved some pixels


def test_pseudo_masks_with_a_walked_background(ci_full_run, tmp_path):
    """`pseudo_masks.bg_power`: only the pseudo masks are redone; each walk's mask is the dense reference walk
    of [(1 - max CAM) ** bg_power, CAMs] (written here in numpy), upsampled, argmax with no threshold; the
    sweep runs over bg_power, and its point at the run's settings on all images is the walk's mIoU."""
    from wsss_core.config import load_config
    from wsss_core.stages.pseudo_masks import pseudo_mask_sweep

    _, first = ci_full_run
    shutil.copytree(first.root, tmp_path / "run")
    cfg = load_config(REPO / "params" / "ci.yaml", {"pseudo_masks.bg_power": 3.0})
    run = stages.open_run(tmp_path / "run", cfg)
    assert run.is_done("boundary") and not run.is_done("pseudo_masks")
    m = stages.run_stage("pseudo_masks", cfg, run).metrics
    p = cfg.pseudo_masks
    kept = read_kept_ids(run)
    checked = 0
    for sid in kept:
        cam = CAMS.read(run, sid)
        if not len(cam.keys):
            assert not WALK_MASKS.read(run, sid).any()
            continue
        c = cam.cam.astype(np.float64)
        x = np.concatenate([(1 - c.max(0))[None] ** 3, c])
        rw = dense_random_walk(x, BOUNDARY_MAPS.read(run, sid).astype(np.float64), p.radius, p.beta, p.exp_times)
        h, w = cam.image_size
        expected = np.array([0, *cam.keys.tolist()])[np.argmax(upsample_x4(rw)[:, :h, :w], axis=0)]
        assert (WALK_MASKS.read(run, sid) == expected).mean() > 0.999, sid
        checked += 1
        if checked == 3:
            break
    assert checked == 3
    assert {s["bg_power"] for s in m["sweep"]} == {*p.sweep_bg_powers, 3.0} and "sem_seg_bg_thres" not in m["sweep"][0]
    other, point = pseudo_mask_sweep(cfg, run, kept, [2.0, 3.0], [p.beta])  # all powers share one walk
    assert point == {"beta": p.beta, "bg_power": 3.0, "miou": pytest.approx(m["walk_miou"], abs=1e-12)}
    assert other["bg_power"] == 2.0 and other["miou"] != point["miou"]
    assert m["walk_miou"] != first.manifest("pseudo_masks")["metrics"]["walk_miou"]


def test_pseudo_mask_scores_are_recomputed_from_the_files(ci_full_run):
    cfg, run = ci_full_run
    m = run.manifest("pseudo_masks")["metrics"]
    ds = stages.dataset(cfg)
    masks = ds.masks("train")
    cm = ConfusionMatrix(ds.num_classes)
    for sid in read_kept_ids(run):
        cm.update(PSEUDO_MASKS.read(run, sid), masks.mask(sid))
    assert m["miou"] == pytest.approx(cm.miou(), abs=1e-12)
    walked = ConfusionMatrix(ds.num_classes)
    for sid in read_kept_ids(run):
        walked.update(WALK_MASKS.read(run, sid), masks.mask(sid))
    assert m["walk_miou"] == pytest.approx(walked.miou(), abs=1e-12) and m["walk_miou"] != m["miou"]
    assert m["cam_miou"] == pytest.approx(run.manifest("cams")["metrics"]["miou_best"], abs=1e-12)
    assert m["confident_labels_miou"] == pytest.approx(run.manifest("crf")["metrics"]["quality"]["miou"], abs=1e-12)


def test_segmenters_and_predictions(ci_full_run):
    cfg, run = ci_full_run
    ds = stages.dataset(cfg)
    weak, bound = run.manifest("segmentation")["metrics"], run.manifest("bound")["metrics"]
    assert weak["epochs"] == bound["epochs"] == cfg.segmentation.epochs and bound["enabled"]
    assert weak["train_images"] == bound["train_images"] == len(read_kept_ids(run))
    net = load_segmenter(model_path(run, "segmentation"))
    assert param_checksum(net) == pytest.approx(weak["param_checksums"][0], rel=1e-9)
    assert param_checksum(load_segmenter(model_path(run, "bound"))) != param_checksum(net)
    m = run.manifest("predict")["metrics"]
    val = ds.ids("val")
    art = predictions("val")
    assert art.ids(run) == sorted(val)
    cm_weak, cm_bound = ConfusionMatrix(ds.num_classes), ConfusionMatrix(ds.num_classes)
    masks = ds.masks("val")
    for sid in val:
        pred = art.read(run, sid)
        assert pred.shape == masks.mask(sid).shape and pred.max() < ds.num_classes
        cm_weak.update(pred, masks.mask(sid))
        cm_bound.update(predictions("bound/val").read(run, sid), masks.mask(sid))
    assert m["val_miou"] == round(100 * cm_weak.miou(), 2)
    assert m["bound_val_miou"] == round(100 * cm_bound.miou(), 2)
    assert m["weak_over_bound"] == round(cm_weak.miou() / cm_bound.miou(), 4)


def test_weak_segmenter_ignores_the_pixels_its_label_sources_disagree_on(ci_full_run, tmp_path):
    """`segmentation.ignore_disagreement`: the weak segmenter trains on the pseudo masks with 255 where
    the walk's mask or the confident labels say otherwise; only it is redone, the bound is not."""
    from wsss_core.artifacts import CONFIDENT_LABELS
    from wsss_core.config import load_config
    from wsss_core.stages.segmentation import (_AgreedPseudoMasks, weak_training_examples,
                                               weak_training_pairs)

    _, first = ci_full_run
    shutil.copytree(first.root, tmp_path / "run")
    cfg = load_config(REPO / "params" / "ci.yaml", {"segmentation.ignore_disagreement": True})
    run = stages.open_run(tmp_path / "run", cfg)
    assert not run.is_done("segmentation") and run.is_done("bound")
    ids = read_kept_ids(run)
    pairs = _AgreedPseudoMasks(stages.dataset(cfg).labelled(cfg.data.train_split), ids, run, refined=True)
    ignored = total = 0
    for i, sid in enumerate(ids):
        mask, walk, sure = PSEUDO_MASKS.read(run, sid), WALK_MASKS.read(run, sid), CONFIDENT_LABELS.read(run, sid)
        expected = np.where((walk != mask) | ((sure != 255) & (sure != mask)), 255, mask)
        assert np.array_equal(pairs[i][1], expected)
        ignored, total = ignored + int((expected == 255).sum()), total + expected.size
    assert 0 < ignored < total  # the ci run's sources do disagree somewhere
    stages.run_stage("segmentation", cfg, run)
    m = run.manifest("segmentation")["metrics"]
    assert m["ignored_share"] == round(ignored / total, 5)
    assert m["param_checksums"][0] != first.manifest("segmentation")["metrics"]["param_checksums"][0]
    assert run.is_done("bound") and not run.is_done("predict")  # predict uses the new segmenter
    rows = weak_training_examples(cfg, run, ids[:2])  # the notebook's pictures: image, pseudo mask, trained on
    assert [[t for t, _ in row] for row in rows] == [[ids[0], "pseudo mask", "trained on"],
                                                     [ids[1], "pseudo mask", "trained on"]]
    assert all(np.array_equal(row[2][1], pairs[i][1]) for i, row in enumerate(rows))
    # no CRF on the walk (crf_gt_prob: null): the pseudo masks are the walk's, only the confident labels count
    shutil.rmtree(WALK_MASKS.dir(run))
    plain = load_config(REPO / "params" / "ci.yaml", {"segmentation.ignore_disagreement": True,
                                                      "pseudo_masks.crf_gt_prob": None})
    pairs = weak_training_pairs(plain, run, ids)
    for i, sid in enumerate(ids):
        mask, sure = PSEUDO_MASKS.read(run, sid), CONFIDENT_LABELS.read(run, sid)
        assert np.array_equal(pairs[i][1], np.where((sure != 255) & (sure != mask), 255, mask))
    # a confident-label file of another size: one line naming both files
    from PIL import Image

    Image.fromarray(np.zeros((5, 7), np.uint8)).save(CONFIDENT_LABELS.path(run, ids[0]))
    h, w = PSEUDO_MASKS.read(run, ids[0]).shape
    with pytest.raises(ValueError, match=rf"^{re.escape(str(CONFIDENT_LABELS.path(run, ids[0])))}: 7x5 label map, but the "
                       rf"pseudo mask {re.escape(str(PSEUDO_MASKS.path(run, ids[0])))} is {w}x{h}$"):
        pairs[0]


def test_report_collects_every_stage(ci_full_run):
    cfg, run = ci_full_run
    report = json.loads((run.folder("report") / "report.json").read_text())
    assert list(report["miou"]) == ["CAM (train)", "confident labels (train)", "random-walk masks (train)",
                                    "pseudo masks (train)",
                                    "segmenter (train)", "bound (train)", "segmenter (val)",
                                    "bound (val)"]
    # each split's lift on its own: the segmenter beside the pseudo masks it was trained on (the same images)
    assert {split: list(lift) for split, lift in report["lift"].items()} == {
        "train": ["CAM", "random-walk masks", "pseudo masks", "segmenter", "bound"],
        "val": ["segmenter", "bound"]}
    assert report["miou"]["pseudo masks (train)"] == run.manifest("pseudo_masks")["metrics"]["miou"]
    masks, cm = stages.dataset(cfg).masks("train"), ConfusionMatrix(len(report["classes"]))
    for sid in read_kept_ids(run):  # the segmenter's train score, recomputed from its prediction files
        cm.update(predictions("train").read(run, sid), masks.mask(sid))
    assert report["miou"]["segmenter (train)"] == pytest.approx(cm.miou(), abs=1e-12)
    assert report["weak_over_bound"] == run.manifest("predict")["metrics"]["weak_over_bound"]
    assert set(report["timings"]) >= {"data", "classifier", "boundary", "segmentation", "predict"}
    assert report["machine"]["torch"] == torch.__version__


@pytest.mark.slow
def test_two_process_segmentation_trains_and_saves_rank_zero_weights(ci_full_run, tmp_path):
    cfg, run = ci_full_run
    root = tmp_path / "run"
    shutil.copytree(run.root, root)
    shutil.rmtree(root / "06_segmentation")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "wsss_core.cli", "stage", "segmentation", "--config", str(REPO / "params" / "ci.yaml"), "--run-dir",
         str(root), "--set", "segmentation.epochs=2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((root / "06_segmentation" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs"] == 2
    c0, c1 = m["param_checksums"]
    assert c0 == pytest.approx(c1, rel=1e-12)  # DDP kept the replicas identical
    saved = load_segmenter(root / "06_segmentation" / "model.pt")
    assert param_checksum(saved) == pytest.approx(c0, rel=1e-12)
