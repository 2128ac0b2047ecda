"""The real stages' dependency graph on a finished ci run: which stages skip,
re-evaluate, rerun or refuse when one parameter changes, `--force`, and that
no rerun throws away a model the new parameters can still use."""

import shutil

import numpy as np
import pytest

from wsss_core import stages
from wsss_core.artifacts import CAMS, CONFIDENT_LABELS, model_path, read_kept_ids, read_scores
from wsss_core.config import load_config
from wsss_core.store import StaleUpstreamError

from conftest import REPO

ORDER = ("data", "classifier", "label_filter", "cams", "crf")


@pytest.fixture
def finished(ci_run, tmp_path):
    """A private copy of the session's finished ci run."""
    _, run = ci_run
    dst = tmp_path / "run"
    shutil.copytree(run.root, dst)
    return dst


def rerun(run_dir, overrides):
    """Run every stage in order with `overrides`; what each one did."""
    cfg = load_config(REPO / "params" / "ci.yaml", overrides)
    run = stages.open_run(run_dir, cfg)
    did = {}
    for name in ORDER:
        r = stages.run_stage(name, cfg, run)
        if r.skipped:
            did[name] = "skipped"
        elif name in ("cams", "crf") and r.metrics["computed"] == 0:
            did[name] = "re-evaluated"
        else:
            did[name] = "ran"
    return did, run


def stamp(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def test_a_speed_knob_changes_nothing(finished):
    model = model_path(stages.open_run(finished, load_config(REPO / "params" / "ci.yaml")), "classifier")
    before = stamp(model)
    did, _ = rerun(finished, {"classifier.num_workers": 1, "crf.workers": 1, "device": "cpu"})
    assert did == dict.fromkeys(ORDER, "skipped")
    assert stamp(model) == before


def test_an_evaluation_threshold_re_evaluates_without_recomputing(finished):
    run0 = stages.open_run(finished, load_config(REPO / "params" / "ci.yaml"))
    model, ckpt = model_path(run0, "classifier"), run0.folder("classifier") / "checkpoint.pt"
    kept = read_kept_ids(run0)
    cam_stamps = {i: CAMS.path(run0, i).stat().st_mtime_ns for i in kept}
    before = stamp(model), stamp(ckpt)
    cams_seconds = run0.manifest("cams")["seconds"]
    did, run = rerun(finished, {"cams.bg_thresholds": [0.2, 0.4], "classifier.eval_threshold": 0.3})
    assert did == {"data": "skipped", "classifier": "ran", "label_filter": "skipped", "cams": "re-evaluated",
                   "crf": "skipped"}
    assert (stamp(model), stamp(ckpt)) == before  # re-evaluated, not retrained
    assert {i: CAMS.path(run, i).stat().st_mtime_ns for i in kept} == cam_stamps
    assert run.manifest("cams")["seconds"] > cams_seconds  # the time that made the CAMs, plus the re-evaluation
    q = run.manifest("cams")["metrics"]["quality"]
    assert q["thresholds"] == [0.2, 0.4] and len(q["miou"]) == 2
    assert run.manifest("classifier")["eval_config"] == {"classifier": {"eval_threshold": 0.3}}


def test_a_classifier_parameter_reruns_it_and_everything_downstream(finished):
    run0 = stages.open_run(finished, load_config(REPO / "params" / "ci.yaml"))
    model = model_path(run0, "classifier")
    before = stamp(model)
    old_cam = CAMS.read(run0, read_kept_ids(run0)[0])
    cfg = load_config(REPO / "params" / "ci.yaml", {"classifier.lr": 0.01})
    with pytest.raises(StaleUpstreamError, match=r"classifier\.lr: 0\.001 -> 0\.01"):
        stages.run_stage("cams", cfg, stages.open_run(finished, cfg))
    did, run = rerun(finished, {"classifier.lr": 0.01})
    # the label filter trains with its own lr: it is not stale
    assert did == {"data": "skipped", "classifier": "ran", "label_filter": "skipped", "cams": "ran", "crf": "ran"}
    after = stamp(model)
    assert after[0] != before[0] and after[1] != before[1]
    kept = read_kept_ids(run)
    assert run.manifest("cams")["metrics"]["computed"] == len(kept) == len(CAMS.ids(run))
    new_cam = CAMS.read(run, kept[0]) if kept[0] == read_kept_ids(run0)[0] else None
    if new_cam is not None and len(new_cam.keys):
        assert not np.array_equal(new_cam.high_res, old_cam.high_res)


def test_a_cam_parameter_reruns_cams_and_crf_and_clears_their_old_files(finished):
    cfg = load_config(REPO / "params" / "ci.yaml", {"cams.method": "gradcam++"})
    run = stages.open_run(finished, cfg)
    stray = run.folder("cams") / "cams" / "not-an-image.npz"
    stray.write_bytes(b"left by other parameters")
    with pytest.raises(StaleUpstreamError, match=r"02_cams was made with other parameters \(cams\.method: "
                                                 r"'gradcam' -> 'gradcam\+\+'\)"):
        stages.run_stage("crf", cfg, run)
    did, run = rerun(finished, {"cams.method": "gradcam++"})
    assert did == {"data": "skipped", "classifier": "skipped", "label_filter": "skipped", "cams": "ran",
                   "crf": "ran"}
    assert not stray.exists()  # outputs of other parameters are gone
    assert CAMS.ids(run) == sorted(read_kept_ids(run)) == CONFIDENT_LABELS.ids(run)


def test_a_crf_parameter_reruns_only_crf(finished):
    did, run = rerun(finished, {"crf.conf_fg_thres": 0.4})
    assert did == {"data": "skipped", "classifier": "skipped", "label_filter": "skipped", "cams": "skipped",
                   "crf": "ran"}
    assert run.manifest("crf")["metrics"]["computed"] == len(read_kept_ids(run))


def test_force_reruns_exactly_one_stage_and_makes_its_downstream_stale(finished):
    cfg = load_config(REPO / "params" / "ci.yaml")
    run = stages.open_run(finished, cfg)
    first = read_kept_ids(run)[0]
    before = CAMS.path(run, first).stat().st_mtime_ns
    r = stages.run_stage("cams", cfg, run, force=True)
    assert not r.skipped and r.metrics["computed"] == len(read_kept_ids(run))
    assert CAMS.path(run, first).stat().st_mtime_ns != before
    assert stages.run_stage("classifier", cfg, run).skipped and stages.run_stage("label_filter", cfg, run).skipped
    # the CRF labels were made from the CAMs before the redo: stale, and rerun on request
    assert run.why_not_done("crf") == "03_crf is stale because its input was redone since: 02_cams"
    crf_before = CONFIDENT_LABELS.path(run, first).stat().st_mtime_ns
    r = stages.run_stage("crf", cfg, run)
    assert not r.skipped and r.metrics["computed"] == len(read_kept_ids(run))  # remade, not resumed
    assert CONFIDENT_LABELS.path(run, first).stat().st_mtime_ns != crf_before
    assert run.is_done("crf")


def test_bound_and_evaluation_changes_in_the_second_half(ci_full_run, tmp_path):
    import json

    _, full = ci_full_run
    shutil.copytree(full.root, tmp_path / "run")
    weak_model = tmp_path / "run" / "06_segmentation" / "model.pt"
    before = stamp(weak_model)
    cfg = load_config(REPO / "params" / "ci.yaml", {"segmentation.bound": False})
    run = stages.open_run(tmp_path / "run", cfg)
    did = {n: stages.run_stage(n, cfg, run).skipped for n in stages.pipeline_order()}
    # turning the bound off retrains nothing: the weak segmenter does not depend on it
    assert [n for n, skipped in did.items() if not skipped] == ["bound", "predict", "report"]
    assert stamp(weak_model) == before
    assert "bound_val_miou" not in run.manifest("predict")["metrics"]
    # an evaluation-only change of the CAMs re-evaluates what reads their scores: pseudo masks, report
    cfg = load_config(REPO / "params" / "ci.yaml", {"segmentation.bound": False, "cams.bg_thresholds": [0.05]})
    run = stages.open_run(tmp_path / "run", cfg)
    did = {n: stages.run_stage(n, cfg, run).skipped for n in stages.pipeline_order()}
    assert [n for n, skipped in did.items() if not skipped] == ["cams", "pseudo_masks", "report"]
    assert read_scores(run, "cams", "cam").note.startswith("background threshold 0.05,")
    assert run.manifest("pseudo_masks")["metrics"]["cam_miou"] == run.manifest("cams")["metrics"]["miou_best"]
    report = json.loads((tmp_path / "run" / "08_report" / "report.json").read_text())
    assert report["miou"]["CAM (train)"] == run.manifest("cams")["metrics"]["miou_best"]


def test_the_bounds_own_epochs_retrain_only_the_bound(ci_full_run, tmp_path):
    """`segmentation.bound_epochs`: the bound trains for its own epochs, the weak segmenter (which
    ignores the key) keeps its model's bytes; set back to the weak one's epochs, the key changes nothing."""
    from wsss_core.artifacts import read_history

    cfg0, full = ci_full_run
    shutil.copytree(full.root, tmp_path / "run")
    weak_model = tmp_path / "run" / "06_segmentation" / "model.pt"
    before = stamp(weak_model)
    epochs = cfg0.segmentation.epochs
    cfg = load_config(REPO / "params" / "ci.yaml", {"segmentation.bound_epochs": epochs + 1})
    run = stages.open_run(tmp_path / "run", cfg)
    did = {n: stages.run_stage(n, cfg, run).skipped for n in stages.pipeline_order()}
    assert [n for n, skipped in did.items() if not skipped] == ["bound", "predict", "report"]
    assert stamp(weak_model) == before
    assert [h["epoch"] for h in read_history(run, "bound")] == list(range(1, epochs + 2))
    assert [h["epoch"] for h in read_history(run, "segmentation")] == list(range(1, epochs + 1))
    assert run.manifest("bound")["metrics"]["epochs"] == epochs + 1
    same = load_config(REPO / "params" / "ci.yaml", {"segmentation.bound_epochs": None})
    assert stages.open_run(tmp_path / "run", same).fingerprint("bound") == \
        stages.open_run(full.root, cfg0).fingerprint("bound")


def test_a_new_stage_version_redoes_that_stage_and_says_why(finished):
    """A fix that changes a stage's outputs for the same parameters raises its version: finished runs redo
    it (and what follows), the stages before are kept, and the reason names the version."""
    import dataclasses

    from wsss_core.stages import registry

    cfg = load_config(REPO / "params" / "ci.yaml")
    before = stages.open_run(finished, cfg)
    fingerprints = {n: before.fingerprint(n) for n in ORDER}
    with registry.scratch():
        s = registry.STAGES["crf"]
        v = s.spec.version
        registry.STAGES["crf"] = dataclasses.replace(s, spec=dataclasses.replace(s.spec, version=v + 1))
        run = stages.open_run(finished, cfg)
        assert {n: run.fingerprint(n) for n in ORDER if n != "crf"} == \
               {n: f for n, f in fingerprints.items() if n != "crf"}
        assert run.fingerprint("crf") != fingerprints["crf"]
        assert run.why_not_done("crf") == (f"03_crf was made by version {v} of the stage's code, which gives "
                                           f"other outputs than version {v + 1}")
        did, run = rerun(finished, {})
        assert did == {**dict.fromkeys(ORDER, "skipped"), "crf": "ran"}
        assert run.manifest("crf")["version"] == v + 1 and run.is_done("crf")
    assert "version" not in before.manifest("classifier")  # version 1 is not written: old manifests still hold


def test_a_stage_refuses_when_a_stage_further_up_was_redone_and_those_between_were_not(ci_full_run, tmp_path):
    """crf redone with --force, boundary and pseudo_masks not: the weak segmenter (which reads the
    confident labels beside the pseudo masks) and predict refuse, naming the first stale stage."""
    _, full = ci_full_run
    shutil.copytree(full.root, tmp_path / "run")
    cfg = load_config(REPO / "params" / "ci.yaml", {"segmentation.ignore_disagreement": True})
    run = stages.open_run(tmp_path / "run", cfg)
    assert not stages.run_stage("crf", cfg, run, force=True).skipped
    assert run.why_not_done("pseudo_masks") is None  # its direct input, the boundary model, was not redone
    plain = load_config(REPO / "params" / "ci.yaml")
    for name, c in (("segmentation", cfg), ("predict", plain)):
        with pytest.raises(StaleUpstreamError, match=r"^stage '" + name + r"' refuses to run on stale inputs: "
                           r"04_boundary is stale because its input was redone since: 03_crf\. "
                           r"Rerun from 'boundary' first \(wsss run --from boundary\)\.$"):
            stages.run_stage(name, c, stages.open_run(tmp_path / "run", c))
    assert stages.run_stage("bound", cfg, run).skipped  # the bound reads only the real masks


def test_a_segmentation_seed_reruns_only_the_segmenters_and_after(ci_full_run, tmp_path):
    """`segmentation.seed`: the two segmenters, predict and the report are redone, with other weights;
    every file of the stages above keeps its bytes and mtime. Unset (null), the top-level seed: nothing to
    do, the fingerprints as before; the classifier's own seed leaves the label filter as it is."""
    import fixtures

    cfg0, full = ci_full_run
    shutil.copytree(full.root, tmp_path / "run")
    upstream = ("data", "classifier", "label_filter", "cams", "crf", "boundary", "pseudo_masks")
    redone = ("segmentation", "bound", "predict", "report")
    assert stages.pipeline_order() == [*upstream, *redone]
    first = stages.open_run(tmp_path / "run", cfg0)
    before = {n: fixtures.snapshot(first.folder(n)) for n in upstream}
    weights = {n: model_path(first, n).read_bytes() for n in ("segmentation", "bound")}
    same = load_config(REPO / "params" / "ci.yaml", {"segmentation.seed": None})
    assert all(stages.open_run(tmp_path / "run", same).fingerprint(n) == first.fingerprint(n)
               for n in stages.pipeline_order())
    cfg = load_config(REPO / "params" / "ci.yaml", {"segmentation.seed": 1})
    run = stages.open_run(tmp_path / "run", cfg)
    did = {n: stages.run_stage(n, cfg, run).skipped for n in stages.pipeline_order()}
    assert [n for n, skipped in did.items() if not skipped] == list(redone)
    assert {n: fixtures.snapshot(run.folder(n)) for n in upstream} == before
    for n, old in weights.items():
        assert model_path(run, n).read_bytes() != old, n  # another seed, other weights
    assert all(stages.run_stage(n, cfg, run).skipped for n in stages.pipeline_order())  # done
