"""Every notebook: stored clean with a parameters cell, and executed with
params/ci.yaml through the pipeline runner (papermill)."""

import json
import re

import nbformat
import pytest

from wsss_core import stages
from wsss_core.config import ConfigError, load_config
from wsss_core.pipeline import (
    NOTEBOOK_DIR,
    TOOL_NOTEBOOKS,
    check_notebook_parameters,
    run_pipeline,
    select_stages,
    stage_notebooks,
)

from conftest import NOTEBOOK_RUNNERS, NOTEBOOKS_RUN, REPO, RUNNERS_PASSED

ALL = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def notebooks_not_run(run: set[str], passed: set[str]) -> list[str]:
    """The notebooks of notebooks/ that no test executed without an error, once every runner passed (when
    one did not, it was not selected, skipped or failed, which fails the suite by itself: [])."""
    if set(NOTEBOOK_RUNNERS) - passed:
        return []
    return sorted({p.name for p in ALL} - run)


def test_every_notebook_is_run_by_the_tests():
    """Runs last (conftest): every notebook in notebooks/ was executed, without an error, by this session's
    tests (the pipeline test, the compare test, the JupyterLab test); a notebook nobody executes fails it.
    Under xdist the controller makes the same check over every worker (conftest.pytest_sessionfinish)."""
    for nb in (*stage_notebooks().values(), *TOOL_NOTEBOOKS):
        assert (NOTEBOOK_DIR / nb).is_file()
    assert {p.name for p in ALL} == {*stage_notebooks().values(), *TOOL_NOTEBOOKS}
    missing = sorted(set(NOTEBOOK_RUNNERS) - RUNNERS_PASSED)
    if missing:  # not selected, skipped or failed (a failure fails the suite by itself)
        pytest.skip(f"the tests that execute the notebooks did not all pass in this session: {', '.join(missing)}")
    assert notebooks_not_run(NOTEBOOKS_RUN, RUNNERS_PASSED) == []


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_notebook_is_stored_clean_with_parameters(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    if path.name != "09_compare.ipynb":  # the comparison reads finished runs: its parameter is `runs`
        assert "config =" in params[0].source and "run_dir =" in params[0].source
    # papermill finds every name the cell assigns (it skips a line with a second "=", even in a comment)
    import ast

    import papermill

    assigned = [t.id for node in ast.parse(params[0].source).body for t in node.targets]
    assert list(papermill.inspect_notebook(str(path))) == assigned


def test_unknown_notebook_parameter_is_refused():
    with pytest.raises(ConfigError, match="unknown parameter"):
        check_notebook_parameters(NOTEBOOK_DIR / "00_data.ipynb", ["config", "run_dir", "scalez"])


def test_stage_selection():
    assert select_stages("data", "data") == ["data"]
    with pytest.raises(ConfigError, match="unknown stage"):
        select_stages("nope")


@pytest.mark.slow
def test_pipeline_executes_every_notebook_with_ci_params(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = REPO / "params" / "ci.yaml"
    # in three parts: the later parts start from finished earlier stages
    root = run_pipeline(config, run_dir, to_stage="classifier")
    run_pipeline(config, run_dir, from_stage="label_filter", to_stage="crf")
    capsys.readouterr()
    run_pipeline(config, run_dir, from_stage="crf")
    # 06_segmentation.ipynb draws two stages: each line gives that stage's own seconds
    out = capsys.readouterr().out
    for name, folder in (("segmentation", "06_segmentation"), ("bound", "06_bound")):
        took = round(json.loads((run_dir / folder / "manifest.json").read_text())["seconds"])
        assert re.search(rf"\) {name} +done in {took} s: val mIoU", out), out
    # (the tool notebook cam_inspector runs on a finished ci run in JupyterLab: test_browser.py)
    for nb in stage_notebooks().values():
        out = root / "notebooks" / nb
        executed = nbformat.read(out, as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors
        images = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert images, f"{nb} drew no picture"
    for folder in ("00_data", "01_classifier", "01_label_filter", "02_cams", "03_crf"):
        assert json.loads((root / folder / "manifest.json").read_text())["status"] == "done"

    # the numbers a notebook shows are the stage's metrics: the values it recorded in its outputs
    from wsss_core.viz import recorded

    metrics = {f: json.loads((root / f / "metrics.json").read_text()) for f in ("01_classifier", "01_label_filter",
                                                                                "02_cams", "03_crf")}
    shown = {name: recorded(root / "notebooks" / name) for name in ("01_classifier.ipynb", "01_label_filter.ipynb",
                                                                    "02_cams.ipynb", "03_crf.ipynb")}
    c, f, q = metrics["01_classifier"], metrics["01_label_filter"], metrics["03_crf"]["quality"]
    assert shown["01_classifier.ipynb"] == {"val_map": c["val_map"], "val_f1_macro": c["val_f1_macro"],
                                            "epochs": c["epochs"]}
    assert shown["01_label_filter.ipynb"] == {"kept": f["kept"], "images": f["images"]}
    assert shown["02_cams.ipynb"] == {"cam_miou": metrics["02_cams"]["miou_best"],
                                      "best_threshold": metrics["02_cams"]["best_threshold"]}
    assert shown["03_crf.ipynb"] == {"precision": q["precision"], "coverage": q["coverage"]}

    # a rerun of the finished run skips every stage without starting a notebook
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / "notebooks").glob("*.ipynb")}
    capsys.readouterr()
    run_pipeline(config, run_dir)
    out = capsys.readouterr().out
    assert out.count("skipped (done)") == len(stage_notebooks()), out
    assert {p.name: p.stat().st_mtime_ns for p in (root / "notebooks").glob("*.ipynb")} == stamps

    # (one changed parameter rerunning exactly its downstream through `wsss run`: the label-edit test below;
    # every parameter of the real stage graph: test_stage_graph.py)
    assert (root / "report.html").is_file() and "weak / bound" in (root / "report.html").read_text()


@pytest.mark.slow
def test_a_killed_pipeline_resumes_where_it_stopped(tmp_path):
    """SIGKILL in the middle of a stage: the rerun redoes no finished stage,
    resumes the interrupted one and leaves no half-written file."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "params" / "ci.yaml")
    stages.run_stage("data", cfg, stages.open_run(run_dir, cfg))  # done before: the rerun must keep it
    cmd = [sys.executable, "-m", "wsss_core.cli", "run", "--config", str(REPO / "params" / "ci.yaml"),
           "--run-dir", str(run_dir), "--to", "label_filter", "--set", "classifier.epochs=6"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpt = run_dir / "01_classifier" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ckpt.exists(), first.communicate()
    os.killpg(first.pid, signal.SIGKILL)  # the pipeline, mid-classifier
    first.wait()
    from wsss_core.store import process_alive

    holder = json.loads((run_dir / "01_classifier" / "manifest.json").read_text())["pid"]  # wsss run itself
    deadline = time.monotonic() + 30
    while process_alive(holder, os.uname().nodename) and time.monotonic() < deadline:
        time.sleep(0.2)
    data_manifest = (run_dir / "00_data" / "manifest.json").read_text()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    out = second.stdout
    assert re.search(r"\(1/3\) data +skipped \(done\)", out), out
    assert re.search(r"\(2/3\) classifier +running \(01_classifier was interrupted", out), out
    assert "resuming classifier from epoch" in out
    assert (run_dir / "00_data" / "manifest.json").read_text() == data_manifest
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]
    assert re.search(r"\(3/3\) label_filter +running \(01_label_filter has not been run\)", out), out
    for folder in ("00_data", "01_classifier", "01_label_filter"):
        assert json.loads((run_dir / folder / "manifest.json").read_text())["status"] == "done"
    history = json.loads((run_dir / "01_classifier" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 7))


@pytest.mark.slow
def test_wsss_run_reruns_everything_after_a_label_edit_and_says_why(tmp_path, capsys):
    from fixtures import make_voc

    root = make_voc(tmp_path / "data")
    config = tmp_path / "voc.yaml"
    config.write_text(f"data:\n  format: voc\n  root: {root}\nclassifier:\n  image_size: 32\n  epochs: 1\n")
    cfg = load_config(config)
    run = stages.open_run(tmp_path / "run", cfg)
    for name in ("data", "classifier"):  # the first run in-process: only the rerun's messages are under test
        stages.run_stage(name, cfg, run)
    csv = root / "image_labels_train.csv"
    csv.write_text(csv.read_text().replace("a1,cat", "a1,dog"))
    capsys.readouterr()
    run_pipeline(config, tmp_path / "run", to_stage="classifier")
    lines = [line for line in capsys.readouterr().out.splitlines() if " running " in line]
    assert len(lines) == 2, lines
    assert re.search(r"\(1/2\) data +running \(00_data was made from other data "
                     r"\(image_labels_train\.csv changed\)\)$", lines[0]), lines
    assert re.search(r"\(2/2\) classifier +running \(01_classifier is stale because its input changed: "
                     r"00_data was made from other data \(image_labels_train\.csv changed\)\)$", lines[1]), lines


def test_a_parameter_file_edited_during_a_run_does_not_reach_its_later_stages(tmp_path):
    """The notebooks of one `wsss run` load the run's snapshot of the config (overrides applied), not the
    YAML: a file edited while the data stage runs (the next experiment being set up) leaves the classifier
    at the parameters the run was started with."""
    config = tmp_path / "ci.yaml"
    text = (REPO / "params" / "ci.yaml").read_text()
    config.write_text(text)
    edited = []

    def echo(event) -> None:
        if event.stage == "data" and event.kind == "done":
            config.write_text(text.replace("  image_size: 64\n  epochs: 1\n", "  image_size: 64\n  epochs: 3\n", 1))
            edited.append(event)

    run_pipeline(config, tmp_path / "run", to_stage="classifier", overrides={"classifier.batch_size": 4}, echo=echo)
    assert edited and "epochs: 3" in config.read_text()
    m = json.loads((tmp_path / "run" / "01_classifier" / "manifest.json").read_text())["metrics"]
    assert m["epochs"] == 1
    snapshot = load_config(tmp_path / "run" / "notebooks" / "config.yaml")
    assert snapshot.classifier.epochs == 1 and snapshot.classifier.batch_size == 4  # the override, applied
    nb = nbformat.read(tmp_path / "run" / "notebooks" / "01_classifier.ipynb", as_version=4)
    assert str(tmp_path / "run" / "notebooks" / "config.yaml") in "".join(c.source for c in nb.cells)


@pytest.mark.slow
def test_a_pseudo_mask_change_reruns_the_segmenter_and_skips_its_bound(ci_full_run, tmp_path, capsys):
    """06_segmentation.ipynb serves two stages; the bound does not read pseudo
    masks, so it is skipped inside the notebook and reported as skipped."""
    import shutil

    _, run = ci_full_run
    shutil.copytree(run.root, tmp_path / "run")
    capsys.readouterr()
    run_pipeline(REPO / "params" / "ci.yaml", tmp_path / "run", from_stage="pseudo_masks",
                 to_stage="bound", overrides={"pseudo_masks.exp_times": 3})
    out = capsys.readouterr().out
    seg = round(json.loads((tmp_path / "run" / "06_segmentation" / "manifest.json").read_text())["seconds"])
    assert re.search(r"\(1/3\) pseudo_masks +running \(05_pseudo_masks was made with other parameters "
                     r"\(pseudo_masks\.exp_times: 4 -> 3\)\)", out), out
    assert re.search(rf"\(2/3\) segmentation +done in {seg} s: val mIoU", out), out
    assert re.search(r"\(3/3\) bound +skipped \(done\): val mIoU", out), out

    # stopping at the segmenter: its notebook still serves the bound, and the line still gives its own time
    run_pipeline(REPO / "params" / "ci.yaml", tmp_path / "run", from_stage="pseudo_masks",
                 to_stage="segmentation", overrides={"pseudo_masks.exp_times": 2})
    out = capsys.readouterr().out
    seg = round(json.loads((tmp_path / "run" / "06_segmentation" / "manifest.json").read_text())["seconds"])
    assert re.search(rf"\(2/2\) segmentation +done in {seg} s: val mIoU", out), out


def test_no_draw_runs_the_stages_and_leaves_the_drawing_to_a_later_run(ci_full_run, tmp_path, capsys):
    """`wsss run --no-draw` executes no notebook (numbers only, as a sweep wants them); the next run with
    drawing draws the notebooks of the stages done since, and redoes no stage."""
    import shutil

    from wsss_core import cli

    _, finished = ci_full_run
    root = tmp_path / "run"
    shutil.copytree(finished.root, root)
    shutil.rmtree(root / "notebooks", ignore_errors=True)
    args = ["run", "--config", str(REPO / "params" / "ci.yaml"), "--run-dir", str(root), "--from", "predict"]
    capsys.readouterr()
    assert cli.main([*args, "--force", "report", "--no-draw"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\(1/2\) predict +skipped \(done\)", out) and re.search(r"\(2/2\) report +done in", out), out
    assert "[wsss] no notebook drawn (--no-draw)" in out and "executed notebooks" not in out
    assert not (root / "notebooks").exists()
    report = (root / "08_report" / "manifest.json").stat().st_mtime_ns
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"\(2/2\) report +skipped \(done\)", out), out
    assert sorted(p.name for p in (root / "notebooks").glob("*.ipynb")) == ["07_predict.ipynb", "08_report.ipynb"]
    assert (root / "08_report" / "manifest.json").stat().st_mtime_ns == report  # drawn, not redone
