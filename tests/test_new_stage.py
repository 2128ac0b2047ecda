"""A new stage is one module (with its config section declared next to it) and
one notebook: registered in a temporary module outside the package, it runs
through `wsss run` (its line, its notebook, papermill) and appears in the
report, and its Path-typed parameter is resolved like every other path,
without touching any other file."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import nbformat
import pytest

from conftest import REPO

CI_YAML = REPO / "params" / "ci.yaml"

MODULE = '''
"""A throw-away stage: the pseudo masks after a k x k majority filter, scored on the train masks."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss_core.artifacts import PSEUDO_MASKS, LabelMaps, write_scores
from wsss_core.config import param
from wsss_core.config.fields import in_range
from wsss_core.metrics import ImageScores
from wsss_core.stages import dataset, register, stage_ids
from wsss_core.stages.per_image import for_each_image
from wsss_core.store import StageResult


@dataclass(frozen=True)
class SmoothConfig:
    size: int = param(3, in_range(1, 15), "majority filter size")
    notes: Path | None = param(None, doc="a file beside the parameter file", kind="runtime")


SMOOTHED = LabelMaps("smooth", "masks", ".png")


def majority(mask, size):
    pad = size // 2
    padded = np.pad(mask, pad, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size)).reshape(*mask.shape, -1)
    counts = np.stack([(windows == k).sum(-1) for k in range(256)], -1)
    return counts.argmax(-1).astype(np.uint8)


@register("smooth", "07_smooth", sections=("smooth",), upstream=("data", "pseudo_masks"), config=SmoothConfig,
          notebook=NOTEBOOK, headline=lambda m: f"smoothed {m['images']} masks")
def smooth_stage(cfg, run):
    split = cfg.data.train_split
    ids = stage_ids(cfg, run, split)
    ds = dataset(cfg)

    def compute(todo):
        for sid in todo:
            yield sid, majority(PSEUDO_MASKS.read(run, sid), cfg.smooth.size)

    def evaluate():
        masks = ds.masks(split)
        scores = ImageScores("smoothed pseudo masks", split, ds.classes, f"{cfg.smooth.size}x{cfg.smooth.size}")
        for sid in ids:
            scores.add(sid, SMOOTHED.read(run, sid), masks.mask(sid))
        write_scores(run, "smooth", "smoothed", scores)
        return {"miou": scores.miou()}

    return StageResult(metrics=for_each_image(run, SMOOTHED, ids, compute, "smoothing", None, evaluate))
'''


def stage_notebook(path, stage: str, after: str = "") -> None:
    """A minimal stage notebook: parameters, then `run_stage(stage)` and its metrics printed (then `after`)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('config = "x"\nrun_dir = "x"\noverrides = {}', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from wsss_core.pipeline import notebook_setup\nfrom wsss_core.stages import "
                                  "run_stage\ncfg, run = notebook_setup(config, run_dir, overrides)\n"
                                  f"print(run_stage({stage!r}, cfg, run).metrics){after}"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def toy_stage(tmp_path):
    """The module and its notebook in a folder of their own (nothing in the repository)."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    stage_notebook(folder / "07_smooth.ipynb", "smooth")
    notebook = f"notebook={str(folder / '07_smooth.ipynb')!r}"
    (folder / "toy_smooth.py").write_text(MODULE.replace("notebook=NOTEBOOK", notebook))
    return folder


def test_a_throw_away_stage_runs_through_wsss_run_and_the_report(toy_stage, ci_full_run, tmp_path):
    _, full = ci_full_run
    run_dir = tmp_path / "run"
    shutil.copytree(full.root, run_dir)
    params = tmp_path / "params"
    params.mkdir()
    (params / "notes.txt").write_text("why 5\n")
    config = params / "with_smooth.yaml"
    config.write_text(CI_YAML.read_text() + "smooth:\n  size: 5\n  notes: notes.txt\n")
    env = {**os.environ, "WSSS_STAGES": "toy_smooth",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(toy_stage), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from wsss_core.config import load_config
        from wsss_core.stages import pipeline_order
        cfg = load_config({str(config)!r})
        print(pipeline_order(), cfg.smooth.size, cfg.smooth.notes)""")], capture_output=True, text=True, env=env)
    assert probe.returncode == 0, probe.stderr
    order, size, notes = probe.stdout.strip().rsplit(" ", 2)
    assert eval(order)[-3:] == ["predict", "smooth", "report"] and size == "5"
    assert notes == str(params / "notes.txt")  # resolved against the YAML's folder, as its type says

    r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "run", "--config", str(config), "--run-dir",
                        str(run_dir), "--no-draw"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    drawn = subprocess.run([sys.executable, "-m", "wsss_core.cli", "run", "--config", str(config), "--run-dir",
                            str(run_dir), "--from", "smooth"], capture_output=True, text=True, env=env, timeout=900)
    assert drawn.returncode == 0, drawn.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("[wsss] (")]
    assert list(dict.fromkeys(line.split()[2] for line in lines)) == ["data", "classifier", "label_filter", "cams", "crf", "boundary",
                                                   "pseudo_masks", "segmentation", "bound", "predict",
                                                   "smooth", "report"]
    ran = list(dict.fromkeys(line.split()[2] for line in lines if "skipped" not in line))
    assert ran == ["smooth", "report"], r.stdout  # nothing else is redone
    assert any(line.startswith("[wsss] (11/12) smooth") and line.endswith("smoothed 16 masks") for line in lines)
    assert sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb")) == ["07_smooth.ipynb", "08_report.ipynb"]
    report = json.loads((run_dir / "08_report" / "report.json").read_text())
    assert "smoothed pseudo masks (train)" in report["miou"]
    assert report["lift"]["train"]["smoothed pseudo masks"] == report["miou"]["smoothed pseudo masks (train)"]
    assert "smoothed pseudo masks (train)" in r.stdout  # the table wsss run prints at the end
    assert report["config"]["changed"]["smooth.size"] == "5"


def test_the_majority_filter_of_the_throw_away_stage(toy_stage, monkeypatch):
    """The toy stage's own rule, so that the test above scores something real."""
    import numpy as np

    from wsss_core.stages import registry

    monkeypatch.syspath_prepend(str(toy_stage))
    with registry.scratch():
        import toy_smooth

        m = np.zeros((5, 5), np.uint8)
        m[2, 2] = 7  # a lone pixel disappears; a 3x3 block stays
        assert toy_smooth.majority(m, 3).max() == 0
        m[1:4, 1:4] = 4  # a 3x3 block: its corners see 4 of 9 in their window and fall, its cross stays
        assert toy_smooth.majority(m, 3)[1:4, 1:4].tolist() == [[0, 4, 0], [4, 4, 4], [0, 4, 0]]


@pytest.mark.parametrize("source, says", [
    ("def broken(:\n", "bad_stage.py:1: SyntaxError"),
    ("raise RuntimeError('boom')\n", "(RuntimeError: boom)"),
    (None, "(ModuleNotFoundError: No module named 'bad_stage')"),
])
def test_a_stage_module_that_fails_to_import_is_one_line(tmp_path, source, says):
    """$WSSS_STAGES names the user's code: whatever its import raises is one line, exit 2, not a
    traceback at `import wsss_core` (every notebook kernel imports the package)."""
    if source is not None:
        (tmp_path / "bad_stage.py").write_text(source)
    env = {**os.environ, "WSSS_STAGES": "bad_stage",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "stages"], capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    line, = r.stderr.splitlines()
    assert line.startswith("wsss: error: $WSSS_STAGES: cannot import stage module 'bad_stage' (") and says in line
    assert r.stdout == ""


BOOM = '''
from wsss_core.stages import register


@register("boom", "00_data_boom", sections=(), upstream=("data",), notebook=NOTEBOOK)
def boom_stage(cfg, run):
    """A stage with a bug of its own."""
    raise RuntimeError("the stage's own bug\\nsecond line of the message")
'''


def test_a_stage_that_raises_stops_wsss_run_with_one_line_naming_it(toy_stage, tmp_path):
    """`wsss run` runs stages in its own process: what a stage raises is one line naming the stage and the
    error (its first line), exit 2; the stage is recorded as failed, the stage before it stays done and drawn;
    `--debug` shows the traceback."""
    (toy_stage / "boom_stage.py").write_text(BOOM.replace("NOTEBOOK", repr(str(toy_stage / "07_smooth.ipynb"))))
    env = {**os.environ, "WSSS_STAGES": "boom_stage",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(toy_stage), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "wsss_core.cli", "run", "--config", str(CI_YAML), "--run-dir", str(tmp_path / "run"),
           "--to", "boom"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.splitlines() == ["wsss: error: stage boom failed: RuntimeError: the stage's own bug"]
    assert re.search(r"\[wsss\] \(2/2\) boom +running \(00_data_boom has not been run\)", r.stdout), r.stdout
    manifest = json.loads((tmp_path / "run" / "00_data_boom" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("RuntimeError: the stage's own bug")
    assert json.loads((tmp_path / "run" / "00_data" / "manifest.json").read_text())["status"] == "done"
    assert (tmp_path / "run" / "notebooks" / "00_data.ipynb").is_file()  # drawn before the next stage ran
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, timeout=600)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "in boom_stage" in debug.stderr


DRAW_FAILS = '''
from wsss_core.stages import register
from wsss_core.store import StageResult


@register("sketch", "00_data_sketch", sections=(), upstream=("data",), notebook=NOTEBOOK)
def sketch_stage(cfg, run):
    """A stage that works, with a notebook that fails to draw it."""
    return StageResult(metrics={"fine": 1})
'''


def test_a_notebook_that_fails_to_draw_is_kept_aside_and_drawn_again_next_time(tmp_path):
    """The stage is done; its notebook's failure is one line naming the failed copy and the cell (as numbered
    in the copy: papermill's injected parameters are cell 2); no executed
    notebook is left under its own name, so the next `wsss run` (which skips the stage) draws it again."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    stage_notebook(folder / "sketch.ipynb", "sketch", "\nraise ValueError('cannot draw')")
    (folder / "sketch_stage.py").write_text(DRAW_FAILS.replace("NOTEBOOK", repr(str(folder / "sketch.ipynb"))))
    env = {**os.environ, "WSSS_STAGES": "sketch_stage",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "wsss_core.cli", "run", "--config", str(CI_YAML), "--run-dir", str(run_dir),
           "--to", "sketch"]
    for attempt in (1, 2):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 2, r.stdout + r.stderr
        failed = run_dir / "notebooks" / "sketch.failed.ipynb"
        assert r.stderr.splitlines() == [f"wsss: error: stage sketch: its notebook failed drawing ({failed}, cell 3): "
                                         "ValueError: cannot draw"]
        assert json.loads((run_dir / "00_data_sketch" / "manifest.json").read_text())["status"] == "done"
        assert failed.is_file() and not (run_dir / "notebooks" / "sketch.ipynb").exists()
        assert bool(re.search(r"\(2/2\) sketch +skipped \(done\)", r.stdout)) == (attempt == 2), r.stdout
        errors = [o for c in nbformat.read(failed, as_version=4).cells for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert [e["ename"] for e in errors] == ["ValueError"]
