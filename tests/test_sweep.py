"""`wsss sweep` and `wsss compare`: a grid of variants that share every stage the
grid does not change (computed once, hard-linked), safe sharing, resume, one
sweep per folder, and paired bootstrap intervals."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsss_core import cli
from wsss_core.compare import compare_runs
from wsss_core.config import ConfigError, load_config
from wsss_core.sweep import parse_grid, parse_seeds, split_values, variants

import fixtures
from conftest import REPO

CI_YAML = REPO / "params" / "ci.yaml"
BETAS = "pseudo_masks.beta=3,5,10"


# --------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("text, parts", [
    ("3,5,10", ["3", "5", "10"]),
    ("[1.0],[1.0,1.5]", ["[1.0]", "[1.0,1.5]"]),
    ("gradcam,gradcam++", ["gradcam", "gradcam++"]),
    ("'a,b',c", ["'a,b'", "c"]),
    ("{x: 1, y: 2},[3]", ["{x: 1, y: 2}", "[3]"]),
])
def test_values_split_on_commas_outside_brackets(text, parts):
    assert split_values(text) == parts


def test_grid_values_are_yaml():
    assert parse_grid(["cams.scales=[1.0],[1.0,1.5]", "pseudo_masks.beta=3,5.5"]) == {
        "cams.scales": [[1.0], [1.0, 1.5]], "pseudo_masks.beta": [3, 5.5]}


@pytest.mark.parametrize("grid, message", [
    ([], "--grid: none given"),
    (["pseudo_masks.beta"], "--grid 'pseudo_masks.beta': expected KEY=V1,V2"),
    (["pseudo_masks.beta="], "--grid pseudo_masks.beta=: empty value"),
    (["pseudo_masks.beta=3,,5"], "empty value"),
    (["pseudo_masks.beta=3,3"], "a value is repeated"),
    (["pseudo_masks.beta=3", "pseudo_masks.beta=5"], "--grid pseudo_masks.beta: given twice"),
    (["cams.scales=[1.0,[0.5]"], "--grid cams.scales=[1.0,[0.5]: not valid YAML"),
    (["cams.scales=" + ",".join("[" + ",".join(f"{0.5 + i / 1000:.3f}" for i in range(60)) + "]" for _ in "a")
      + ",[1.0]"], "--grid: the variant name scales=[0.5,0.501,0.502,0.503,0.504,0.505,0.506,0.507,0.508,... is 361 bytes, "
      "too long for a folder name (at most 200)"),
])
def test_a_bad_grid_is_one_line(grid, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        variants(CI_YAML, parse_grid(grid), {})


@pytest.mark.parametrize("grid, message", [
    (["pseudo_masks.betta=3,5"], "--grid pseudo_masks.betta=3: unknown key (known keys in pseudo_masks: beta,"),
    (["pseudo_masks.beta=3,fast"], "--grid pseudo_masks.beta=fast: must be a number"),
    (["crf.workers=0,2"], "--grid crf.workers: a runtime-only field"),
])
def test_every_combination_is_checked_before_any_work(grid, message, tmp_path, capsys):
    argv = ["sweep", "--config", str(CI_YAML), "--run-dir", str(tmp_path / "s")]
    for g in grid:
        argv += ["--grid", g]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_variants_are_named_by_their_values():
    names = [v.name for v in variants(CI_YAML, parse_grid([BETAS, "pseudo_masks.exp_times=4,8"]), {})]
    assert names == ["beta=3,exp_times=4", "beta=3,exp_times=8", "beta=5,exp_times=4", "beta=5,exp_times=8",
                     "beta=10,exp_times=4", "beta=10,exp_times=8"]
    clash = variants(CI_YAML, parse_grid(["cams.flip=true,false", "pseudo_masks.flip=true"]), {})
    assert clash[1].name == "cams.flip=false,pseudo_masks.flip=true"  # the same leaf name twice: dotted


# --------------------------------------------------------------------------- seed replicates
def test_seed_replicates_are_named_by_the_seeds_they_move():
    names = [v.name for v in variants(CI_YAML, parse_grid(["pseudo_masks.beta=3,5"]), {},
                                      parse_seeds("segmentation=3"))]
    assert names == ["beta=3", "beta=3,segmentation.seed=1", "beta=3,segmentation.seed=2",
                     "beta=5", "beta=5,segmentation.seed=1", "beta=5,segmentation.seed=2"]
    # no grid: the parameter file itself and its replicates; a stage seed the file sets counts from there
    v = variants(CI_YAML, {}, {"boundary.seed": 7}, parse_seeds("boundary,segmentation=2"))
    assert [(x.name, x.values) for x in v] == [
        ("base", {}), ("boundary.seed=8,segmentation.seed=1", {"boundary.seed": 8, "segmentation.seed": 1})]
    # all: the top-level seed, and every stage seed the file sets (the others follow the top-level one)
    v = variants(CI_YAML, {}, {"seed": 4, "classifier.seed": 10}, parse_seeds("all=3"))
    assert [x.values for x in v] == [{}, {"seed": 5, "classifier.seed": 11}, {"seed": 6, "classifier.seed": 12}]
    for x in v:
        cfg = load_config(CI_YAML, {"seed": 4, "classifier.seed": 10, **x.values})
        assert cfg.seed_of("boundary") == cfg.seed and cfg.seed_of("classifier") == cfg.seed + 6


@pytest.mark.parametrize("text, message", [
    ("segmentation", "--seeds 'segmentation': expected STAGE[,STAGE]=N or all=N"),
    ("segmentation=1", "the number of seeds must be in [2, 100], got 1"),
    ("segmentation=three", "'three' is not a whole number of seeds"),
    ("cams=3", "'cams' draws no random numbers of its own; stages with a seed: classifier, label_filter, "
               "boundary, segmentation (or all)"),
    ("bound=3", "(the bound trains with segmentation.seed)"),
    ("segmentation,segmentation=2", "a stage is named twice"),
])
def test_a_bad_seeds_option_is_one_line(text, message, tmp_path, capsys):
    assert cli.main(["sweep", "--config", str(CI_YAML), "--run-dir", str(tmp_path / "s"), "--seeds", text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_a_grid_over_a_seed_the_replicates_move_is_refused():
    with pytest.raises(ConfigError, match=re.escape("--grid segmentation.seed sweeps a seed the replicates move")):
        variants(CI_YAML, parse_grid(["segmentation.seed=0,1"]), {}, parse_seeds("segmentation=2"))
    # a grid over another stage's seed is a grid like any other
    assert len(variants(CI_YAML, parse_grid(["boundary.seed=0,1"]), {}, parse_seeds("segmentation=2"))) == 4


def test_seed_replicates_share_everything_upstream_and_compare_pools_them(ci_full_run, tmp_path, capsys):
    """`--seeds segmentation=2` reusing a finished run: the first replicate is that run (nothing redone),
    the second trains both segmenters again and shares every stage above; compare makes them one row whose
    mean and spread are those of the two runs' own scores."""
    import statistics

    from wsss_core.artifacts import read_scores
    from wsss_core.stages import open_run

    _, full = ci_full_run
    folder = tmp_path / "seeds"
    r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "sweep", "--config", str(CI_YAML), "--run-dir",
                        str(folder), "--seeds", "segmentation=2", "--reuse", str(full.root), "--no-draw"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((folder / "sweep.json").read_text())["seeds"] == "segmentation=2"
    names = ["base", "segmentation.seed=1"]
    assert re.findall(r"\] (\w+) done in", r.stdout) == ["segmentation", "bound", "predict", "report"]
    assert not list((folder / names[1]).glob("notebooks/*.ipynb"))  # --no-draw: numbers only
    for f in ("04_boundary/model.pt", "05_pseudo_masks/masks/train_0000.png", "01_classifier/model.pt"):
        assert {os.stat(folder / n / f).st_ino for n in names} == {os.stat(full.root / f).st_ino}
    weak = [folder / n / "06_segmentation" / "model.pt" for n in names]
    assert os.stat(weak[0]).st_ino == os.stat(full.root / "06_segmentation" / "model.pt").st_ino
    assert weak[0].read_bytes() != weak[1].read_bytes()
    assert load_config(folder / names[1] / "config.yaml").seed_of("segmentation") == 1
    c = compare_runs([folder], resamples=200)
    assert c.runs == ["base"] and c.members == {"base": names} and c.differs == {}
    runs = [open_run(folder / n, load_config(folder / n / "config.yaml")) for n in names]
    values = [read_scores(x, "predict", "val").miou() for x in runs]
    m = c.miou["predict/val"]["base"]
    assert m.seeds == pytest.approx(tuple(values), abs=1e-12) and m.value == pytest.approx(np.mean(values))
    assert m.sd == pytest.approx(statistics.stdev(values), abs=1e-12) and not m.images_only
    cam = c.miou["cams/cam"]["base"]  # the shared CAMs: the same figure for both seeds
    assert cam.seeds[0] == cam.seeds[1] and cam.sd == 0.0
    assert cli.main(["compare", str(folder), "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "base: 2 seed(s): base (seed 0); segmentation.seed=1 (seed 0, segmentation.seed 1)" in out


# --------------------------------------------------------------------------- a real sweep on params/ci.yaml
def snapshot(root: Path) -> dict[str, str]:
    return fixtures.snapshot(root, mtimes=False)


@pytest.fixture(scope="module")
def sweep(ci_run, tmp_path_factory):
    """pseudo_masks.beta = 3, 5, 10 to the pseudo masks, reusing the finished first half of the ci run."""
    _, first = ci_run
    folder = tmp_path_factory.mktemp("sweep") / "walk"
    r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "sweep", "--config", str(CI_YAML), "--run-dir",
                        str(folder), "--grid", BETAS, "--to", "pseudo_masks", "--reuse", str(first.root)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    return folder, r.stdout


def test_the_sweep_computes_each_stage_once(sweep, ci_run):
    folder, out = sweep
    _, first = ci_run
    names = ["beta=3", "beta=5", "beta=10"]
    assert json.loads((folder / "sweep.json").read_text())["grid"] == {"pseudo_masks.beta": [3, 5, 10]}
    # the variants ran from the sweep's copy of the parameter file, each with its own value applied
    assert load_config(folder / "base-config.yaml") == load_config(CI_YAML)
    for n in names:
        assert load_config(folder / n / "notebooks" / "config.yaml").pseudo_masks.beta == float(n[5:])
    for stage_file in ("01_classifier/model.pt", "03_crf/confident_labels/train_0000.png"):  # the reused first half
        assert {os.stat(folder / n / stage_file).st_ino for n in names} == {os.stat(first.root / stage_file).st_ino}
    boundary = {os.stat(folder / n / "04_boundary" / "model.pt").st_ino for n in names}
    assert len(boundary) == 1  # trained once, by the first variant
    masks = [folder / n / "05_pseudo_masks" / "masks" / "train_0000.png" for n in names]
    assert len({os.stat(m).st_ino for m in masks}) == 3  # three sets of pseudo masks
    assert len(re.findall(r"\] boundary +running", out)) == 1
    assert len(re.findall(r"\] pseudo_masks +running", out)) == 3
    assert "[2/3 beta=5] boundary shared with beta=3 (same parameters)" in out
    assert "[1/3 beta=3] classifier shared with" in out
    for n in names:  # each variant a normal run: nothing to do for wsss run
        r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "run", "--config", str(CI_YAML), "--run-dir",
                            str(folder / n), "--to", "pseudo_masks", "--set", f"pseudo_masks.beta={n[5:]}"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.count("skipped (done)") == 7, r.stdout + r.stderr


def test_compare_names_the_one_difference_and_gives_intervals(sweep, capsys):
    folder, _ = sweep
    c = compare_runs([folder], resamples=200)
    assert list(c.differs) == ["pseudo_masks.beta"]
    assert c.differs["pseudo_masks.beta"] == {"beta=3": "3.0", "beta=5": "5.0", "beta=10": "10.0"}
    assert c.evaluations == ["cams/cam", "crf/confident_labels", "pseudo_masks/before_crf",
                             "pseudo_masks/pseudo_masks"]
    pm = c.miou["pseudo_masks/pseudo_masks"]
    assert set(pm) == {"beta=3", "beta=5", "beta=10"} and all(i.low <= i.value <= i.high for i in pm.values())
    same = c.delta["cams/cam"]  # the shared CAMs: a difference of exactly 0 from the baseline
    assert all(d.value == d.low == d.high == 0 for d in same.values())
    assert cli.main(["compare", str(folder), "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "pseudo_masks.beta: beta=3 3.0, beta=5 5.0, beta=10 10.0" in out and "200 resamples" in out
    page = (folder / "comparison.html").read_text()
    assert page.count("<img src=\"data:image/png;base64,") >= 3
    # self-contained: no link outside the page (the embedded images' base64 may spell "http" by chance)
    assert "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)


def test_forcing_a_shared_stage_in_one_variant_changes_no_other(sweep, tmp_path):
    """`wsss run --force boundary` in one variant (its notebooks too, which papermill writes) leaves every
    file of the other variants as it was."""
    folder, _ = sweep
    copy = tmp_path / "walk"
    shutil.copytree(folder, copy, symlinks=True, copy_function=os.link)  # hard links, as the sweep made them
    before = {n: snapshot(copy / n) for n in ("beta=5", "beta=10")}
    assert any(k.startswith("notebooks/") for k in before["beta=5"])
    r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "run", "--force", "boundary", "--to", "pseudo_masks",
                        "--config", str(CI_YAML), "--run-dir", str(copy / "beta=3"), "--set", "pseudo_masks.beta=3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for n in ("beta=5", "beta=10"):
        assert snapshot(copy / n) == before[n]
    assert os.stat(copy / "beta=3" / "04_boundary" / "model.pt").st_ino != \
        os.stat(copy / "beta=5" / "04_boundary" / "model.pt").st_ino
    assert os.stat(copy / "beta=3" / "notebooks" / "04_boundary.ipynb").st_ino != \
        os.stat(copy / "beta=5" / "notebooks" / "04_boundary.ipynb").st_ino


def test_a_grid_over_an_evaluation_field_re_evaluates_shared_stages_without_touching_the_source(ci_run, tmp_path):
    """Variants that differ in an evaluation-only field share the CAMs and re-evaluate them; the run
    they were taken from (--reuse) and the first variant keep their files."""
    _, first = ci_run
    before = snapshot(first.root)
    folder = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "sweep", "--config", str(CI_YAML), "--run-dir",
                        str(folder), "--grid", "cams.bg_thresholds=[0.1],[0.3]", "--to", "cams", "--reuse",
                        str(first.root), "--no-draw"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert snapshot(first.root) == before
    a, b = (json.loads((folder / n / "02_cams" / "result.json").read_text())
            for n in ("bg_thresholds=[0.1]", "bg_thresholds=[0.3]"))
    assert (a["best_threshold"], b["best_threshold"]) == (0.1, 0.3)
    cams = [folder / n / "02_cams" / "cams" / "train_0000.npz" for n in ("bg_thresholds=[0.1]", "bg_thresholds=[0.3]")]
    assert os.stat(cams[0]).st_ino == os.stat(cams[1]).st_ino == os.stat(first.root / "02_cams/cams/train_0000.npz").st_ino


def test_compare_leaves_out_variants_that_have_not_started(sweep, tmp_path):
    folder, _ = sweep
    copy = tmp_path / "walk"
    shutil.copytree(folder, copy, symlinks=True, copy_function=os.link)
    shutil.rmtree(copy / "beta=10")
    assert compare_runs([copy], resamples=200).runs == ["beta=3", "beta=5"]


def test_a_second_sweep_on_the_same_folder_refuses(sweep, capsys):
    folder, _ = sweep
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / ".wsss.lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "token": "x",
                                                       "started": "now", "command": "wsss sweep"}))
        assert cli.main(["sweep", "--config", str(CI_YAML), "--run-dir", str(folder), "--grid", BETAS,
                         "--to", "pseudo_masks"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"wsss: error: {folder}: in use by pid {holder.pid} on {os.uname().nodename} since now "
                       "(wsss sweep); wait for it to finish or stop it"]
    finally:
        holder.kill()
        holder.wait()
        (folder / ".wsss.lock").unlink(missing_ok=True)
    assert cli.main(["sweep", "--config", str(CI_YAML), "--run-dir", str(folder), "--grid",
                     "pseudo_masks.beta=3,7", "--to", "pseudo_masks"]) == 2
    assert "holds another sweep" in capsys.readouterr().err


def test_a_killed_sweep_resumes_with_nothing_finished_redone(ci_run, tmp_path):
    _, first = ci_run
    folder = tmp_path / "walk"
    cmd = [sys.executable, "-m", "wsss_core.cli", "sweep", "--config", str(CI_YAML), "--run-dir", str(folder),
           "--grid", "pseudo_masks.beta=3,5", "--to", "pseudo_masks", "--reuse", str(first.root), "--no-draw"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    done = folder / "beta=3" / "05_pseudo_masks" / "manifest.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None and not (done.is_file() and '"done"' in done.read_text()):
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)  # the sweep and the variant it runs
    p.wait()
    gone = time.monotonic() + 60  # the variant's process too (its lock is rightly "in use" while it exits)
    while time.monotonic() < gone:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    assert '"done"' in done.read_text()
    finished = {str(q): q.stat().st_mtime_ns for q in (folder / "beta=3").rglob("*") if q.is_file()
                and "notebooks" not in q.parts and q.name not in (".wsss.lock", "sweep.log")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not re.search(r"\[1/2 beta=3\] \w+ +running", r.stdout), r.stdout
    assert re.search(r"\[2/2 beta=5\] pseudo_masks +(running|done)", r.stdout), r.stdout
    for path, mtime in finished.items():
        assert Path(path).stat().st_mtime_ns == mtime, path


def test_a_fresh_sweep_with_nothing_to_reuse(tmp_path):
    """No --reuse, an empty folder: the first variant computes, the second shares (each child `wsss run`
    finds its variant folder already made by the sweep and accepts it)."""
    folder = tmp_path / "fresh"
    r = subprocess.run([sys.executable, "-m", "wsss_core.cli", "sweep", "--config", str(CI_YAML), "--run-dir",
                        str(folder), "--grid", "cams.flip=true,false", "--to", "data"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\[1/2 flip=true\] data +running", r.stdout), r.stdout
    assert "[2/2 flip=false] data shared with flip=true (same parameters)" in r.stdout
    assert [load_config(folder / n / "config.yaml").cams.flip for n in ("flip=true", "flip=false")] == [True, False]
    stats = [os.stat(folder / n / "00_data" / "manifest.json").st_ino for n in ("flip=true", "flip=false")]
    assert stats[0] == stats[1]


def test_the_compare_notebook_draws_the_same(sweep, tmp_path):
    import nbformat

    from wsss_core.pipeline import NOTEBOOK_DIR, execute_notebook

    folder, _ = sweep
    out = execute_notebook(NOTEBOOK_DIR / "09_compare.ipynb", tmp_path / "09.ipynb",
                           {"runs": [str(folder)], "resamples": 200})
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
    assert "pseudo_masks.beta: beta=3 3.0, beta=5 5.0, beta=10 10.0" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2 * 4  # intervals + heat map per evaluation:
    # CAM, confident labels, the walk's masks before the CRF, pseudo masks


def test_a_shared_stage_takes_time_once_in_the_variants_and_in_their_archives(sweep, tmp_path):
    """compare's time per stage: a stage hard-linked from an earlier variant took none of its own (0), and
    archives (copies, not links) of the same variants say the same."""
    from wsss_core.archive import archive_run

    folder, _ = sweep
    names = ["beta=3", "beta=5", "beta=10"]
    live = compare_runs([folder]).seconds
    assert list(live) == names
    assert live["beta=3"]["boundary"] > 0 and live["beta=5"]["boundary"] == live["beta=10"]["boundary"] == 0.0
    assert all(live[n]["pseudo_masks"] > 0 for n in names)  # each variant's own
    kept = [archive_run(folder / n, tmp_path / n) for n in names]
    assert compare_runs(kept).seconds == live


def test_one_run_alone_gets_its_intervals(sweep, capsys):
    """The noise level of a run's own numbers: intervals, no differences."""
    folder, _ = sweep
    c = compare_runs([folder / "beta=5"], resamples=200)
    assert c.runs == ["beta=5"] and c.differs == {} and all(d == {} for d in c.delta.values())
    m = c.miou["pseudo_masks/pseudo_masks"]["beta=5"]
    assert m.low < m.value < m.high
    assert cli.main(["compare", str(folder / "beta=5"), "--resamples", "200", "--out",
                     str(folder.parent / "one.html")]) == 0
    assert "beta=5" in capsys.readouterr().out and (folder.parent / "one.html").is_file()


def test_compare_refuses_what_would_mislead_or_destroy(sweep, ci_run, tmp_path, capsys):
    """The probe's cases: --out into a run (its config.yaml replaced by HTML), the same run twice, two runs
    whose folder names match (labels collapsed: one run's numbers printed for both), an absurd --resamples,
    runs of different datasets."""
    folder, _ = sweep
    run = folder / "beta=5"
    before = snapshot(run)
    cases = [
        (["compare", str(run), "--out", str(run / "config.yaml")],
         f"--out {run / 'config.yaml'}: the comparison is an HTML page; give a file name ending in .html"),
        (["compare", str(run), "--out", str(run / "01_classifier" / "x.html")],
         f"--out {run / '01_classifier' / 'x.html'}: inside the run {run}, whose files are results; write the "
         "comparison elsewhere"),
        (["compare", str(run), str(run), "--out", str(tmp_path / "c.html")],
         f"{run}: the same run is named twice; compare each run once"),
        (["compare", str(run), "--resamples", "1000000000000", "--out", str(tmp_path / "c.html")],
         "--resamples 1000000000000: must be in [100, 100000]"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"wsss: error: {message}"), err
    assert snapshot(run) == before and not (tmp_path / "c.html").exists()
    # two runs named alike are labelled apart, each with its own numbers
    twin = tmp_path / "g2" / "beta=5"
    shutil.copytree(folder / "beta=10", twin)
    c = compare_runs([run, twin], resamples=200)
    assert c.runs == [f"{folder.name}/beta=5", "g2/beta=5"]
    key = "pseudo_masks/pseudo_masks"
    assert c.miou[key][c.runs[0]].value != c.miou[key][c.runs[1]].value
    # another dataset: a run whose scores name other classes
    other = tmp_path / "other" / "run"
    shutil.copytree(run, other)
    scores = other / "05_pseudo_masks" / "scores" / "pseudo_masks.npz"
    arrays = dict(np.load(scores, allow_pickle=False))
    arrays["classes"] = np.array([f"x{i}" for i in range(len(arrays["classes"]))])
    scores.unlink()
    np.savez(scores, **arrays)
    with pytest.raises(ConfigError, match=r"scores other classes than .*runs of different datasets cannot be "
                                          r"compared"):
        compare_runs([run, other], resamples=200)
