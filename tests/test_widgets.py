"""The CAM inspector's callbacks, driven headless: set values, check the
rendered arrays change as they should and the maps are cached."""

import numpy as np
import pytest

from wsss_core.widgets import CamInspector


@pytest.fixture(scope="module")
def inspector(ci_run):
    cfg, run = ci_run
    return CamInspector(cfg, run)


def first_labelled(insp):
    return next(i for i in insp.ids if insp.labelled_class_names(i))


def test_maps_are_cached_per_image_method_and_scales(inspector):
    i = first_labelled(inspector)
    c = inspector.labelled_class_names(i)[0]
    before = inspector.computed
    inspector.render(i, c, "gradcam", (1.0,), 0.2)
    inspector.render(i, c, "gradcam", (1.0,), 0.5, alpha=0.9, crf=True)  # sliders only: no recompute
    assert inspector.computed == before + 1
    inspector.render(i, c, "gradcam++", (1.0,), 0.2)
    inspector.render(i, c, "gradcam", (1.0, 0.5), 0.2)
    assert inspector.computed == before + 3


def test_threshold_alpha_method_and_crf_change_the_picture(inspector):
    i = first_labelled(inspector)
    c = inspector.labelled_class_names(i)[0]
    k = inspector.ds.classes.index(c)
    low = inspector.render(i, c, "gradcam", (1.0,), 0.05)
    high = inspector.render(i, c, "gradcam", (1.0,), 0.6)
    assert (low.labels != 0).sum() > (high.labels != 0).sum()  # higher background threshold, less foreground
    assert set(np.unique(low.labels)) <= {0, *[inspector.ds.classes.index(n) for n in inspector.labelled_class_names(i)]}
    assert k in np.unique(low.labels)
    a0 = inspector.render(i, c, "gradcam", (1.0,), 0.2, alpha=0.0)
    a1 = inspector.render(i, c, "gradcam", (1.0,), 0.2, alpha=0.8)
    assert np.array_equal(a0.cam_overlay, a0.image) and not np.array_equal(a1.cam_overlay, a0.image)
    assert np.array_equal(a0.cam, a1.cam)
    pp = inspector.render(i, c, "gradcam++", (1.0,), 0.2)
    assert not np.allclose(pp.cam, a0.cam)
    assert 0.0 <= pp.cam.min() and pp.cam.max() <= 1.0 + 1e-3
    crf = inspector.render(i, c, "gradcam", (1.0,), 0.2, crf=True)
    assert crf.labels.shape == a0.labels.shape
    assert set(np.unique(crf.labels)) <= set(np.unique(a0.labels)) | {0}


def test_widget_controls_drive_the_render(inspector):
    panel = inspector.widget()
    ctl = panel.controls
    first = inspector.last
    assert first is not None and first.image.shape[2] == 3
    computed = inspector.computed
    ctl["bg_threshold"].value = 0.05
    low_fg = (inspector.last.labels != 0).sum()
    ctl["bg_threshold"].value = 0.9
    assert (inspector.last.labels != 0).sum() < low_fg or low_fg == 0
    ctl["alpha"].value = 0.0
    assert np.array_equal(inspector.last.cam_overlay, inspector.last.image)
    assert inspector.computed == computed  # sliders reuse the cached maps
    before = inspector.last.cam.copy()
    ctl["method"].value = "gradcam++"
    assert inspector.computed <= computed + 1 and not np.allclose(inspector.last.cam, before)
    other = [i for i in inspector.ids if i != ctl["image"].value][0]
    ctl["image"].value = other
    assert inspector.last.image.shape == inspector.images.image(other).shape
    assert ctl["class"].options[0] in inspector.class_names(other)


def test_widget_opens_on_the_runs_cam_settings(inspector, ci_run):
    cfg, run = ci_run
    ctl = inspector.widget().controls
    assert ctl["method"].value == cfg.cams.method
    assert ctl["scales"].value == tuple(cfg.cams.scales)
    assert ctl["scales"].label == ", ".join(map(str, cfg.cams.scales)) + " (this run)"
    assert ctl["bg_threshold"].value == pytest.approx(run.manifest("cams")["metrics"]["best_threshold"])
    assert inspector.run_settings()["flip"] == cfg.cams.flip


def test_second_half_panels_come_from_the_stored_outputs(ci_full_run):
    from wsss_core.artifacts import BOUNDARY_MAPS, CONFIDENT_LABELS, PSEUDO_MASKS, WALK_MASKS, read_kept_ids

    cfg, run = ci_full_run
    insp = CamInspector(cfg, run)
    kept = read_kept_ids(run)
    panels = dict(insp.second_half(kept[0]))
    assert list(panels) == ["CAM (stride 4, max)", "confident labels", "boundary", "random walk (max)",
                            "walk's mask", "pseudo mask", "ground truth"]
    assert np.array_equal(panels["confident labels"], CONFIDENT_LABELS.read(run, kept[0]))
    assert np.array_equal(panels["boundary"], BOUNDARY_MAPS.read(run, kept[0]))
    assert np.array_equal(panels["walk's mask"], WALK_MASKS.read(run, kept[0]))  # the walk repeats the stage
    assert np.array_equal(panels["pseudo mask"], PSEUDO_MASKS.read(run, kept[0]))
    dropped = [i for i in insp.ids if i not in set(kept)]
    assert dropped and insp.second_half(dropped[0]) is None
    panel = insp.widget()
    assert len(panel.children) == 5  # controls, the CAM row, the second half
