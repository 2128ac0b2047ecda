"""The command line as a new user meets it: every bad input is one clear line
naming the file or key, a non-zero exit, no training, and a finished run left
exactly as it was; plus the run lock, data edits, Ctrl-C and file modes."""

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from wsss_core import cli, stages
from wsss_core.config import load_config
from wsss_core.store import StaleUpstreamError

from conftest import REPO
from fixtures import make_voc

CI_YAML = REPO / "params" / "ci.yaml"


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with its bytes' digest and mtime."""
    return {str(p.relative_to(root)): f"{hashlib.sha1(p.read_bytes()).hexdigest()}:{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(ci_run, tmp_path_factory):
    """A private copy of the session's finished ci run (data .. crf)."""
    _, run = ci_run
    dst = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(run.root, dst)
    return dst


def edited_ci(tmp: Path, name: str, edit=None, text: str | None = None) -> Path:
    """A copy of params/ci.yaml with `edit(raw)` applied (or the given text)."""
    p = tmp / f"{name}.yaml"
    if text is None:
        raw = yaml.safe_load(CI_YAML.read_text())
        if edit:
            edit(raw)
        text = yaml.safe_dump(raw, sort_keys=False)
    p.write_text(text)
    return p


def voc_config(tmp: Path, name: str, **voc_kw) -> Path:
    root = make_voc(tmp / f"{name}-data", **voc_kw)
    p = tmp / f"{name}.yaml"
    p.write_text(f"name: {name}\ndata:\n  format: voc\n  root: {root}\nclassifier:\n  image_size: 32\n")
    return p


def _set(path: str, value):
    def edit(raw):
        node = raw
        *parents, last = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value

    return edit


def _ci_text_with_duplicate_key() -> str:
    return CI_YAML.read_text().replace("  epochs: 1\n", "  epochs: 1\n  epochs: 3\n", 1)


def _voc_overlap(tmp: Path) -> Path:
    return voc_config(tmp, "overlap", splits={"train": ["a0", "a1", "a2"], "val": ["a1", "b1"]})


def _voc_empty_train(tmp: Path) -> Path:
    cfg = voc_config(tmp, "empty")
    (tmp / "empty-data" / "ImageSets/Segmentation/train.txt").write_text("")
    return cfg


def _voc_no_classes_file(tmp: Path) -> Path:
    """Labels naming 'flower' (not a VOC class) and no classes.txt."""
    cfg = voc_config(tmp, "noclasses")
    root = tmp / "noclasses-data"
    for csv in root.glob("image_labels_*.csv"):
        csv.write_text(csv.read_text().replace(",cat", ",flower"))
    (root / "classes.txt").unlink()
    return cfg


def _voc_truncated_image(tmp: Path) -> Path:
    cfg = voc_config(tmp, "trunc")
    img = tmp / "trunc-data" / "JPEGImages" / "a1.jpg"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    return cfg


# name: (config maker, argv after the command word, expected pieces of the one-line message)
# {cfg} is the config file, {run} the finished run (or a fresh folder for data cases)
CASES = {
    "misspelt key": (lambda t: edited_ci(t, "a", _set("cams.scalez", [1.0])), ["stage", "cams"],
                     ["{cfg}: cams.scalez: unknown key"]),
    "wrong type": (lambda t: edited_ci(t, "b", _set("classifier.epochs", "two")), ["stage", "classifier"],
                   ["{cfg}: classifier.epochs: must be an integer"]),
    "impossible value": (lambda t: edited_ci(t, "c", _set("classifier.lr", -1.0)), ["stage", "classifier"],
                         ["{cfg}: classifier.lr: must be > 0"]),
    "duplicate key": (lambda t: edited_ci(t, "d", text=_ci_text_with_duplicate_key()), ["stage", "classifier"],
                      ["{cfg}: classifier.epochs: duplicate key"]),
    "empty file": (lambda t: edited_ci(t, "e", text=""), ["run"], ["{cfg}: the parameter file is empty"]),
    "bad yaml": (lambda t: edited_ci(t, "f", text="cams: [unclosed\n"), ["stage", "cams"], ["{cfg}: not valid YAML"]),
    "missing file": (lambda t: t / "nope.yaml", ["run"], ["nope.yaml: parameter file not found"]),
    "top-level list": (lambda t: edited_ci(t, "g", text="- a\n- b\n"), ["validate"], ["{cfg}: top level must be a mapping"]),
    "bad --set syntax": (lambda t: CI_YAML, ["stage", "cams", "--set", "cams.scales=[1.0,"],
                         ["--set cams.scales=[1.0,: not valid YAML"]),
    "--set without =": (lambda t: CI_YAML, ["stage", "cams", "--set", "cams.scales"], ["--set 'cams.scales': expected KEY=VALUE"]),
    "--set unknown key": (lambda t: CI_YAML, ["stage", "cams", "--set", "cams.sclaes=[1.0]"], ["cams.sclaes: unknown key"]),
    "crossed thresholds": (lambda t: CI_YAML, ["stage", "crf", "--set", "crf.conf_bg_thres=0.5"],
                           ["crf.conf_bg_thres: must be <= crf.conf_fg_thres"]),
    "missing weights": (lambda t: CI_YAML, ["stage", "classifier", "--set", "classifier.weights=no/such.pt"],
                        ["classifier.weights: weights file not found"]),
    "missing data root": (lambda t: CI_YAML, ["validate", "--set", "data.format=voc", "--set", "data.root=/no/such/dir"],
                          ["/no/such/dir: dataset folder not found"]),
    "voc without root": (lambda t: CI_YAML, ["validate", "--set", "data.format=voc"], ["data.root: required"]),
    "empty split": (_voc_empty_train, ["validate"], ["split 'train' has no images"]),
    "same id in train and val": (_voc_overlap, ["stage", "data"], ["1 image ids are in both 'train' and 'val'", "'a1'"]),
    "missing classes.txt": (_voc_no_classes_file, ["validate"], ["unknown class name 'flower'", "classes.txt is missing"]),
    "truncated image": (_voc_truncated_image, ["validate"], ["a1.jpg"]),
    "split without labels": (lambda t: CI_YAML, ["validate", "--set", "cams.split=test"],
                             ["cams.split: 'test' is not a split of this run"]),
    "unknown excluded class": (lambda t: CI_YAML, ["validate", "--set", "classifier.exclude_classes=[zebra]"],
                               ["classifier.exclude_classes: 'zebra' not in the class list"]),
    "unknown cam layer": (lambda t: CI_YAML, ["stage", "cams", "--force", "--set", "cams.layer=nosuch"],
                          ["cams.layer: 'nosuch' is not a layer"]),
    "unknown filter class": (lambda t: CI_YAML, ["validate", "--set", "label_filter.class_name=unicorn"],
                             ["label_filter.class_name: 'unicorn' is not a class"]),
    "missing trusted list": (lambda t: CI_YAML, ["validate", "--set", "label_filter.trusted_list=no/trusted.txt"],
                             ["label_filter.trusted_list: file not found"]),
    "unknown stage": (lambda t: CI_YAML, ["stage", "nope"], ["unknown stage 'nope'"]),
    "unknown --from": (lambda t: CI_YAML, ["run", "--from", "nope"], ["--from nope: unknown stage"]),
    "--from after --to": (lambda t: CI_YAML, ["run", "--from", "crf", "--to", "data"], ["--from crf comes after --to data"]),
    "unknown --force": (lambda t: CI_YAML, ["run", "--force", "nope"], ["--force nope: unknown stage"]),
    "stale upstream (stage)": (lambda t: CI_YAML, ["stage", "cams", "--set", "classifier.lr=0.01"],
                               ["refuses to run on stale inputs", "classifier.lr: 0.001 -> 0.01"]),
    "stale upstream (run)": (lambda t: CI_YAML, ["run", "--from", "cams", "--to", "cams", "--set", "classifier.lr=1e-2"],
                             ["refuses to run on stale inputs", "classifier.lr: 0.001 -> 0.01"]),
}

if not torch.cuda.is_available():  # with a GPU, device: cuda is valid
    CASES["cuda without a GPU (stage)"] = (lambda t: CI_YAML, ["stage", "crf", "--force", "--set", "device=cuda"],
                                           ["device: cuda was requested but no CUDA device is available"])
    CASES["cuda without a GPU (run)"] = (lambda t: CI_YAML, ["run", "--set", "device=cuda"],
                                         ["device: cuda was requested but no CUDA device is available"])

NEEDS_RUN_DIR = ("run", "stage")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(case, finished, tmp_path, capsys):
    make_config, args, expected = CASES[case]
    config = make_config(tmp_path)
    data_case = config.parent == tmp_path and (tmp_path / f"{config.stem}-data").exists()
    run_dir = tmp_path / "fresh-run" if data_case else finished
    argv = [args[0], "--config", str(config), *(["--run-dir", str(run_dir)] if args[0] in NEEDS_RUN_DIR else []),
            *args[1:]]
    before = snapshot(finished)
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsss: error: "), err
    for piece in expected:
        assert piece.format(cfg=config) in lines[0], lines[0]
    assert snapshot(finished) == before  # previous results intact, nothing half-written
    assert not (tmp_path / "fresh-run").exists()  # no run folder for a command that failed its checks
    assert "Traceback" not in out + err


def test_table_covers_at_least_25_cases():
    assert len(CASES) >= 25


# --------------------------------------------------------------------------- through a real process
def wsss(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsss_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_exit_codes_and_messages_through_a_process(tmp_path, capsys):
    assert cli.main(["validate", "--config", str(CI_YAML)]) == 0
    assert "parameters valid for every stage" in capsys.readouterr().out
    bad = wsss("stage", "cams", "--config", str(CI_YAML), "--run-dir", str(tmp_path / "r"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "wsss: error: stage 'cams' refuses to run on stale inputs: 00_data has not been run; 01_classifier has "
        "not been run; 01_label_filter has not been run. Rerun from 'data' first (wsss run --from data)."]
    assert not (tmp_path / "r").exists()
    with pytest.raises(StaleUpstreamError):  # --debug: the exception itself, with its traceback
        cli.main(["stage", "cams", "--config", str(CI_YAML), "--run-dir", str(tmp_path / "r"), "--debug"])


def test_scientific_notation_in_yaml_and_set(tmp_path):
    p = edited_ci(tmp_path, "sci", text=CI_YAML.read_text() + "")
    p.write_text(p.read_text().replace("  lr: 3.0e-3\n", "  lr: 3e-3\n"))
    assert load_config(p).label_filter.lr == 0.003
    assert load_config(CI_YAML, {"classifier.lr": cli._overrides(["classifier.lr=1e-3"])["classifier.lr"]}) \
        .classifier.lr == 0.001


def test_refused_commands_leave_config_yaml_alone(finished, capsys):
    before = (finished / "config.yaml").read_bytes()
    assert cli.main(["stage", "cams", "--config", str(CI_YAML), "--run-dir", str(finished),
                     "--set", "classifier.lr=0.5"]) == 2
    assert cli.main(["stage", "crf", "--config", str(CI_YAML), "--run-dir", str(finished)]) == 0  # skipped
    assert (finished / "config.yaml").read_bytes() == before


def test_outputs_follow_the_umask(finished):
    mask = os.umask(0)
    os.umask(mask)
    for p in (finished / "02_cams" / "manifest.json", next((finished / "02_cams" / "cams").glob("*.npz")),
              finished / "01_classifier" / "model.pt"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_the_registry_and_the_data_stage_do_not_import_torch(tmp_path):
    """Stage modules import torch and the models where they use them: the data
    stage, a fully skipped rerun and the pipeline start without a second of imports."""
    script = (
        "import sys\n"
        "from wsss_core import pipeline, stages\n"
        "from wsss_core.config import load_config\n"
        f"cfg = load_config({str(CI_YAML)!r})\n"
        f"run = stages.open_run({str(tmp_path / 'run')!r}, cfg)\n"
        "first = stages.run_stage('data', cfg, run)\n"
        "again = stages.run_stage('data', cfg, run)\n"
        "print(first.skipped, again.skipped, sorted(m for m in ('torch', 'torchvision', 'timm', "
        "'segmentation_models_pytorch') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False True []"


# --------------------------------------------------------------------------- one run per folder
def test_second_process_on_a_locked_run_refuses_naming_the_pid(finished, tmp_path, capsys):
    run = stages.open_run(finished, load_config(CI_YAML))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (finished / ".wsss.lock").write_text(
            f'{{"pid": {holder.pid}, "host": "{os.uname().nodename}", "token": "x", "started": "now", '
            '"command": "wsss run"}')
        capsys.readouterr()
        assert cli.main(["stage", "crf", "--force", "--config", str(CI_YAML), "--run-dir", str(finished)]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
        assert cli.main(["run", "--config", str(CI_YAML), "--run-dir", str(finished)]) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is taken over with a message
    with run.lock("test"):
        assert (finished / ".wsss.lock").is_file()
    assert not (finished / ".wsss.lock").exists()


def _status_running(manifest) -> bool:
    """The manifest says running; a rerun deletes it before writing it again, so absent means not yet."""
    try:
        return '"running"' in manifest.read_text()
    except FileNotFoundError:
        return False


def test_two_concurrent_runs_the_second_refuses(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "r")
    first = subprocess.Popen([sys.executable, "-m", "wsss_core.cli", "run", "--config", str(CI_YAML), "--run-dir",
                              str(tmp_path / "r"), "--set", "classifier.epochs=40"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lock = tmp_path / "r" / ".wsss.lock"
    manifest = tmp_path / "r" / "01_classifier" / "manifest.json"
    try:
        deadline = time.monotonic() + 120
        while not _status_running(manifest) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lock.exists() and _status_running(manifest), first.communicate()
        second = wsss("run", "--config", str(CI_YAML), "--run-dir", str(tmp_path / "r"))
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"wsss: error: {tmp_path / 'r'}: in use by pid {first.pid} on {os.uname().nodename} since "
            f"{yaml.safe_load(lock.read_text())['started']} (wsss run); wait for it to finish or stop it"]
    finally:
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group (the kernel too)
        out, err = first.communicate(timeout=120)
    # Ctrl-C: one line saying what is kept and how to resume, exit 130; the lock is released
    assert first.returncode == 130, err
    assert err.strip().splitlines() == ["wsss: interrupted. Finished stages and the finished files of the "
                                        "interrupted stage are kept; run the same command again to resume."]
    assert not lock.exists()
    assert "01_classifier" in stages.open_run(tmp_path / "r", load_config(CI_YAML, {"classifier.epochs": 40})) \
        .why_not_done("classifier")


def test_a_killed_stage_is_reported_as_interrupted(tmp_path):
    cfg = load_config(CI_YAML)
    stages.run_stage("data", cfg, stages.open_run(tmp_path / "r", cfg))
    p = subprocess.Popen([sys.executable, "-m", "wsss_core.cli", "stage", "classifier", "--config", str(CI_YAML),
                          "--run-dir", str(tmp_path / "r"), "--set", "classifier.epochs=30"],
                         stdout=subprocess.PIPE, text=True)
    manifest = tmp_path / "r" / "01_classifier" / "manifest.json"
    deadline = time.monotonic() + 120
    while not _status_running(manifest) and time.monotonic() < deadline:
        time.sleep(0.2)
    p.kill()
    p.wait()
    r = wsss("stage", "cams", "--config", str(CI_YAML), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2
    assert f"01_classifier was interrupted (process {p.pid} stopped before it finished)" in r.stderr


# --------------------------------------------------------------------------- data edits
def test_editing_a_label_reruns_data_and_everything_downstream(tmp_path, capsys):
    config = voc_config(tmp_path, "edit")
    cfg = load_config(config)
    run = stages.open_run(tmp_path / "run", cfg)
    for name in ("data", "classifier"):
        stages.run_stage(name, cfg, run)
    csv = tmp_path / "edit-data" / "image_labels_train.csv"
    csv.write_text(csv.read_text().replace("a1,cat", "a1,dog"))
    run = stages.open_run(tmp_path / "run", load_config(config))
    assert not run.is_done("data") and not run.usable("classifier")
    assert run.why_not_done("data") == "00_data was made from other data (image_labels_train.csv changed)"
    assert "00_data was made from other data (image_labels_train.csv changed)" in run.why_not_done("classifier")
    img = tmp_path / "edit-data" / "JPEGImages" / "a2.jpg"
    img.write_bytes(img.read_bytes() + b"\0")  # a replaced image
    run = stages.open_run(tmp_path / "run", load_config(config))
    assert run.why_not_done("data") == ("00_data was made from other data (image_labels_train.csv changed; "
                                        "1 image changed in train (e.g. a2))")
    assert not stages.run_stage("data", cfg, run).skipped
    assert not stages.run_stage("classifier", cfg, run).skipped
