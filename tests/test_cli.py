"""The command line as a new user meets it: every bad input is one clear line
naming the file or key, a non-zero exit, no training, and a finished run left
exactly as it was; plus the run lock, data edits, Ctrl-C and file modes."""

import hashlib
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from wsss_core import cli, stages
from wsss_core.config import load_config
from wsss_core.store import StaleUpstreamError

from conftest import REPO, require
from fixtures import make_voc, snapshot

CI_YAML = REPO / "params" / "ci.yaml"


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


def _file(path: Path) -> Path:
    path.write_text("not a folder\n")
    return path


def _binary_file(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)))
    return path


def _voc_escaping_id(tmp: Path) -> Path:
    cfg = voc_config(tmp, "escape")
    lst = tmp / "escape-data" / "ImageSets/Segmentation/train.txt"
    lst.write_text(lst.read_text() + "../../../../elsewhere/a\n")
    return cfg


def _voc_id_with_space(tmp: Path) -> Path:
    cfg = voc_config(tmp, "space")
    (tmp / "space-data" / "ImageSets/Segmentation/train.txt").write_text("a0\nmy image\n")
    return cfg


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _laughs() -> str:
    """Nine levels of YAML aliases: a few hundred bytes that expand to ~10^9 values."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


def _voc_no_labels(tmp: Path) -> Path:
    cfg = voc_config(tmp, "nolabels")
    csv = tmp / "nolabels-data" / "image_labels_train.csv"
    csv.write_text("image_id,labels\n" + "".join(f"a{k},\n" for k in range(4)))
    return cfg


def _voc_class_with_space(tmp: Path) -> Path:
    cfg = voc_config(tmp, "wild")
    (tmp / "wild-data" / "classes.txt").write_text("background\ncat\nwild flower\n")
    return cfg


# name: (config maker, argv after the command word, expected pieces of the one-line message)
# {cfg} is the config file, {tmp} the test's folder; --run-dir is the finished run (or a fresh folder for
# data cases) unless the argv gives one. A piece starting with "=" is the whole message.
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
    "--set unknown key": (lambda t: CI_YAML, ["stage", "cams", "--set", "cams.sclaes=[1.0]"],
                          ["--set cams.sclaes=[1.0]: unknown key (known keys in cams: bg_thresholds,"]),
    "crossed thresholds": (lambda t: CI_YAML, ["stage", "crf", "--set", "crf.conf_bg_thres=0.5"],
                           ["--set crf.conf_bg_thres=0.5: must be <= crf.conf_fg_thres"]),
    "missing weights": (lambda t: CI_YAML, ["stage", "classifier", "--set", "classifier.weights=no/such.pt"],
                        ["--set classifier.weights=no/such.pt: weights file not found"]),
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
    "--force outside --from / --to": (lambda t: CI_YAML, ["run", "--from", "cams", "--to", "crf", "--force", "predict"],
                                      ["=--force predict: not among the stages this run does (cams .. crf); widen "
                                       "--from / --to or drop it"]),
    "stale upstream (stage)": (lambda t: CI_YAML, ["stage", "cams", "--set", "classifier.lr=0.01"],
                               ["refuses to run on stale inputs", "classifier.lr: 0.001 -> 0.01"]),
    "stale upstream (run)": (lambda t: CI_YAML, ["run", "--from", "cams", "--to", "cams", "--set", "classifier.lr=1e-2"],
                             ["refuses to run on stale inputs", "classifier.lr: 0.001 -> 0.01"]),
    # --- validation before deletion: nothing that passes the config layer may crash a stage after it cleared
    "seed too large for the RNGs": (lambda t: CI_YAML, ["stage", "classifier", "--force", "--set",
                                                        "seed=99999999999999999999999"],
                                    ["=--set seed=99999999999999999999999: must be in [0, 4294967295], "
                                     "got 99999999999999999999999"]),
    "infinite learning rate": (lambda t: CI_YAML, ["run", "--force", "classifier", "--set", "classifier.lr=.inf"],
                               ["=--set classifier.lr=.inf: must be a finite number, got inf"]),
    "not a number": (lambda t: CI_YAML, ["stage", "classifier", "--force", "--set", "classifier.lr=.nan"],
                     ["=--set classifier.lr=.nan: must be a finite number, got nan"]),
    "--set names itself, not the file": (lambda t: CI_YAML, ["stage", "classifier", "--set",
                                                             "classifier.batch_size=0"],
                                         ["=--set classifier.batch_size=0: must be in [1, 65536], got 0"]),
    "text UTF-8 cannot write": (lambda t: edited_ci(t, "u", _set("name", "a\udcffb")), ["stage", "classifier", "--force"],
                                ["={cfg}: name: 'a\\udcffb' is not valid text (UTF-8 cannot encode it)"]),
    "--set value no YAML reads": (lambda t: CI_YAML, ["stage", "classifier", "--force", "--set", "name=a\udcffb"],
                                  ["=--set name=a\\udcffb: not valid YAML: unacceptable character #xdcff: special "
                                   "characters are not allowed in \"<unicode string>\", position 1"]),
    # --- the parameter file itself
    "binary --config": (lambda t: _binary_file(t / "model.yaml"), ["stage", "data"],
                        ["={cfg}: not a text file (a parameter file is UTF-8 YAML)"]),
    "--config is a folder": (lambda t: t, ["validate"],
                             ["={cfg}: is a folder, not a parameter file (e.g. params/default.yaml)"]),
    # --- the run folder
    "--run-dir is a file": (lambda t: _file(t / "run.txt") and CI_YAML, ["stage", "data", "--run-dir", "{tmp}/run.txt"],
                            ["={tmp}/run.txt: is a file, not a folder (the run folder)"]),
    "--run-dir under a file": (lambda t: _file(t / "run.txt") and CI_YAML, ["run", "--run-dir", "{tmp}/run.txt/x"],
                               ["={tmp}/run.txt: is a file, so {tmp}/run.txt/x cannot be created (the run folder)"]),
    # --- the dataset's index files
    "id leaving the dataset": (_voc_escaping_id, ["validate"],
                               ["train.txt: line 5: image id '../../../../elsewhere/a' contains '/' (ids are file names, "
                                "without folders, in this layout)"]),
    "whitespace inside an id": (_voc_id_with_space, ["run"],
                                ["train.txt: line 2: image id 'my image' contains whitespace"]),
    "class name with a space": (_voc_class_with_space, ["validate"],
                                ["classes.txt: line 3: class name 'wild flower' contains whitespace, which the "
                                 "space-separated labels of image_labels_<split>.csv cannot name (write it as "
                                 "'wild_flower')"]),
    # --- found by a fresh-eyes probe
    "YAML aliases (billion laughs)": (lambda t: edited_ci(t, "laughs", text=_laughs()), ["validate"],
                                      ["={cfg}: line 1: anchors and aliases (&name, *name) are not supported in "
                                       "parameter files; write the values out"]),
    "YAML nested too deeply": (lambda t: edited_ci(t, "deep", text="x: " + "[" * 5_000 + "]" * 5_000),
                               ["validate"],
                               ["={cfg}: not valid YAML: nested too deeply"]),
    "--set of a whole section": (lambda t: CI_YAML, ["stage", "cams", "--set", "cams={scales: [2.0]}"],
                                 ["=--set cams={scales: [2.0]}: is a section; set its keys one by one "
                                  "(e.g. cams.<key>=...), so the file's other values stay"]),
    "empty --run-dir": (lambda t: CI_YAML, ["run", "--run-dir", ""], ["=--run-dir: empty path"]),
    "a stage folder that is a file (run)": (lambda t: _file(_folder(t / "r") / "03_crf") and CI_YAML,
                                            ["run", "--run-dir", "{tmp}/r"],
                                            ["={tmp}/r/03_crf: is a file, not a folder; a run keeps 03_crf's outputs "
                                             "there (move it away)"]),
    "a stage folder that is a file (stage)": (lambda t: _file(_folder(t / "r") / "07_predict") and CI_YAML,
                                              ["stage", "data", "--run-dir", "{tmp}/r"],
                                              ["={tmp}/r/07_predict: is a file, not a folder; a run keeps "
                                               "07_predict's outputs there (move it away)"]),
    "--run-dir a folder that is not a run": (lambda t: _file(_folder(t / "mine") / "notes.txt") and CI_YAML,
                                             ["stage", "data", "--run-dir", "{tmp}/mine"],
                                             ["={tmp}/mine: is not a run folder and not empty (no config.yaml or "
                                              "stage folders of wsss); choose an empty or new folder"]),
    "--run-dir inside the dataset": (lambda t: voc_config(t, "inside"), ["stage", "data", "--run-dir",
                                                                         "{tmp}/inside-data/run"],
                                     ["={tmp}/inside-data/run: is inside the dataset folder {tmp}/inside-data; a run "
                                      "must not write into its data (choose another --run-dir)"]),
    "no image has a label": (_voc_no_labels, ["run"], ["no image of split 'train' has an image-level label"]),
    # --- found by a probe of 30 new inputs (issue #36): sizes bounded, so validation stays quick
    "a 10 MB parameter file": (lambda t: edited_ci(t, "huge", text="cams:\n  bg_thresholds: [" + "0.25, " * 2_000_000
                                                   + "0.25]\n"), ["validate"],
                               ["={cfg}: 12.0 MB; a parameter file is at most 256 kB (params/*.yaml are a few kB)"]),
    "a list of 10,001 values": (lambda t: edited_ci(t, "long", text="cams:\n  scales: [1.0]\n  bg_thresholds:\n"
                                                    + "  - 0.25\n" * 10_001), ["validate"],
                                ["={cfg}: line 10004: a list of more than 10000 values; parameter lists hold at "
                                 "most 10000"]),
    "--set a list of 10,001 values": (lambda t: CI_YAML, ["validate", "--set",
                                                          "cams.bg_thresholds=[" + "0.25," * 10_000 + "0.25]"],
                                      ["=--set cams.bg_thresholds=[0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25... (50006 "
                                       "characters): line 1: a list of more than 10000 values; parameter lists hold "
                                       "at most 10000"]),
    "a section with nothing under it": (lambda t: edited_ci(t, "bare", text=CI_YAML.read_text() + "predict:\n"),
                                        ["validate"],
                                        ["={cfg}: predict: the section is empty; give its keys (indented below "
                                         "it) or delete the line"]),
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
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    own_run_dir = "--run-dir" in args
    argv = [args[0], "--config", str(config),
            *(["--run-dir", str(run_dir)] if args[0] in NEEDS_RUN_DIR and not own_run_dir else []), *args[1:]]
    before = snapshot(finished)
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsss: error: "), err
    for piece in expected:
        piece = piece.replace("{cfg}", str(config)).replace("{tmp}", str(tmp_path))
        if piece.startswith("="):
            assert lines[0] == f"wsss: error: {piece[1:]}"
        else:
            assert piece in lines[0], lines[0]
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


@pytest.mark.parametrize("command", [["{bin}/wsss"], ["{python}", "-m", "wsss_core.cli"]])
def test_a_deleted_working_folder_is_one_line(command, tmp_path):
    """The probe's case: the shell's folder deleted under it; torch's import would die in oneMKL
    ("Cannot load libtorch_cpu.so"); the command says what is wrong instead."""
    gone = tmp_path / "gone"
    gone.mkdir()
    argv = " ".join(shlex.quote(a.format(bin=Path(sys.executable).parent, python=sys.executable)) for a in command)
    r = subprocess.run(["sh", "-c", f"cd {shlex.quote(str(gone))} && rmdir {shlex.quote(str(gone))} && exec {argv} "
                        f"validate --config {shlex.quote(str(CI_YAML))}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["wsss: error: the current folder no longer exists (deleted or moved); cd to an "
                                     "existing folder and rerun"]


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
                              str(tmp_path / "r"), "--set", "classifier.epochs=100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             # as from a terminal: a background job (`... &`, as CI may start us) ignores SIGINT
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lock = tmp_path / "r" / ".wsss.lock"
    manifest = tmp_path / "r" / "01_classifier" / "manifest.json"
    try:
        deadline = time.monotonic() + 120
        while not _status_running(manifest) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lock.exists() and _status_running(manifest), "the first run did not start its classifier"
        second = wsss("run", "--config", str(CI_YAML), "--run-dir", str(tmp_path / "r"))
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"wsss: error: {tmp_path / 'r'}: in use by pid {first.pid} on {os.uname().nodename} since "
            f"{yaml.safe_load(lock.read_text())['started']} (wsss run); wait for it to finish or stop it"]
    finally:
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group (the kernel too)
        try:
            out, err = first.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # never left running (it would train 100,000 epochs)
            os.killpg(first.pid, signal.SIGKILL)
            raise
    # Ctrl-C: one line saying what is kept and how to resume, exit 130; the lock is released
    assert first.returncode == 130, err
    assert err.strip().splitlines() == ["wsss: interrupted. Finished stages and the finished files of the "
                                        "interrupted stage are kept; run the same command again to resume."]
    assert not lock.exists()
    assert "01_classifier" in stages.open_run(tmp_path / "r", load_config(CI_YAML, {"classifier.epochs": 100000})) \
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


# --------------------------------------------------------------------------- every number has a range
def _numeric_fields(cls=None, prefix: str = "") -> list[tuple[str, int | None]]:
    """(dotted key, tuple length or None) of every int / float field, nested sections included."""
    import dataclasses
    import typing

    from wsss_core.config import config_class

    cls = cls or config_class()
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(tp, f"{key}.")
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if tp in (int, float) or (typing.get_origin(tp) in (typing.Union, types.UnionType) and args in ([int], [float])):
            out.append((key, None))
        elif typing.get_origin(tp) is tuple and args and args[0] in (int, float):
            out.append((key, 1 if args[-1] is Ellipsis else len(args)))
    return out


NUMERIC = _numeric_fields()


def test_every_numeric_field_is_found():
    keys = [k for k, _ in NUMERIC]
    assert len(keys) >= 60 and {"seed", "data.synthetic.seed", "classifier.lr", "cams.scales",
                                "segmentation.atrous_rates", "classifier.augment.scale_range"} <= set(keys)


@pytest.mark.parametrize("key, length", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_number_out_of_range_is_refused_before_any_work(key, length, finished, capsys):
    """inf, -inf, a 30-digit integer and a negative value: one line naming the --set, exit 2,
    the finished run byte-identical (the probe saw a huge seed and an infinite lr delete a classifier)."""
    before = snapshot(finished)
    for value in (".inf", "-.inf", "123456789012345678901234567890", "-1"):
        text = value if length is None else "[" + ", ".join([value] * length) + "]"
        capsys.readouterr()
        code = cli.main(["stage", "classifier", "--force", "--config", str(CI_YAML), "--run-dir", str(finished),
                         "--set", f"{key}={text}"])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (key, value, err)
        assert lines[0].startswith(f"wsss: error: --set {key}={text}: "), lines[0]
    assert snapshot(finished) == before


# --------------------------------------------------------------------------- wsss predict: the user's photos
def _photos(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (20 + k, 30, 3), dtype=np.uint8)).save(folder / f"p{k}.png")
    return folder


def _out_is_a_symlinked_photo(t: Path) -> list[str]:
    """An input that is a link to the output it would get: --overwrite must not replace it."""
    out = _photos(t / "out", 1)
    photos = _photos(t / "photos", 0)
    (photos / "p0.png").symlink_to(out / "p0.png")
    return ["--images", str(photos), "--out", str(out), "--overwrite"]


# name: (folder maker returning the argv after `predict --run RUN`, the whole one-line message)
PREDICT_CASES = {
    "--out is --images, PNG photos": (lambda t: ["--images", str(_photos(t / "photos")), "--out", str(t / "photos")],
                                      "--out {tmp}/photos: is the image folder {tmp}/photos or inside it; masks would "
                                      "mix with the photos (and PNG photos would be replaced): choose another folder"),
    "--out is --images with --overwrite": (lambda t: ["--images", str(_photos(t / "photos")), "--out",
                                                      str(t / "photos"), "--overwrite"],
                                           "--out {tmp}/photos: is the image folder {tmp}/photos or inside it; masks "
                                           "would mix with the photos (and PNG photos would be replaced): choose "
                                           "another folder"),
    "--out inside --images": (lambda t: ["--images", str(_photos(t / "photos")), "--out", str(t / "photos" / "m")],
                              "--out {tmp}/photos/m: is the image folder {tmp}/photos or inside it; masks would mix "
                              "with the photos (and PNG photos would be replaced): choose another folder"),
    "--out is a file": (lambda t: ["--images", str(_photos(t / "photos")), "--out", str(_file(t / "out.png"))],
                        "{tmp}/out.png: is a file, not a folder (the output folder)"),
    "--overwrite never replaces an input": (_out_is_a_symlinked_photo,
                                            "{tmp}/out/p0.png: is one of the input images; refusing to replace it "
                                            "with a mask (choose another --out)"),
}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_predict_never_touches_the_photos(case, ci_full_run, tmp_path, capsys):
    _, run = ci_full_run
    make, message = PREDICT_CASES[case]
    args = make(tmp_path)
    before, run_before = snapshot(tmp_path), snapshot(run.root)
    capsys.readouterr()
    code = cli.main(["predict", "--run", str(run.root), *args])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().splitlines() == [f"wsss: error: {message.format(tmp=tmp_path)}"], err
    assert snapshot(tmp_path) == before and snapshot(run.root) == run_before


def test_two_predicts_into_one_folder_one_refuses_and_no_mask_is_lost(ci_full_run, tmp_path):
    """Both start at once; one writes every mask, the other refuses in one line (the folder is in use, or its
    masks exist); the masks equal those of a single run."""
    _, run = ci_full_run
    photos = _photos(tmp_path / "photos", 3)
    cmd = [sys.executable, "-m", "wsss_core.cli", "predict", "--run", str(run.root), "--images", str(photos),
           "--out", str(tmp_path / "out")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results
    (_, out_ok, _), (_, _, err_bad) = sorted(results, key=lambda r: r[0])
    assert "3 masks written" in out_ok
    line = err_bad.strip().splitlines()
    assert len(line) == 1 and ("in use by pid" in line[0] or "3 output file(s) exist" in line[0]), err_bad
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert cli.main(["predict", "--run", str(run.root), "--images", str(photos), "--out", str(tmp_path / "one")]) == 0
    for name in ("p0.png", "p1.png", "p2.png"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_predict_into_a_folder_another_predict_is_writing_says_in_use(ci_full_run, tmp_path, capsys):
    """Half its masks written and its lock held by a live process: the answer names that process (not "1 output
    file(s) exist", which invites --overwrite), and nothing is touched."""
    from wsss_core.predict_folder import PREDICT_LOCK

    _, run = ci_full_run
    photos = _photos(tmp_path / "photos", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "p0.png").write_bytes(b"half done")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / PREDICT_LOCK).write_text(f'{{"pid": {holder.pid}, "host": "{os.uname().nodename}", "token": "x", '
                                        '"started": "now", "command": "wsss predict"}')
        before = snapshot(tmp_path)
        capsys.readouterr()
        assert cli.main(["predict", "--run", str(run.root), "--images", str(photos), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"wsss: error: {out}: in use by pid {holder.pid} on {os.uname().nodename} since now "
                       "(wsss predict); wait for it to finish or stop it"], err
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()  # its holder gone: the masks that exist are what stands in the way
    assert cli.main(["predict", "--run", str(run.root), "--images", str(photos), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"wsss: error: {out}: 1 output file(s) exist, e.g. p0.png (--overwrite to replace them)"]


def test_an_exclusive_write_never_replaces(tmp_path):
    from wsss_core.artifacts import write_label_png
    from wsss_core.store import FileError

    p = write_label_png(tmp_path / "m.png", np.zeros((3, 3), np.uint8))
    first = p.read_bytes()
    with pytest.raises(FileError, match=re.escape(f"{p}: already exists")):
        write_label_png(p, np.ones((3, 3), np.uint8), exclusive=True)
    assert p.read_bytes() == first and [q.name for q in tmp_path.iterdir()] == ["m.png"]


# --------------------------------------------------------------------------- permissions and a full disk
def as_other_user(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run `cmd` as a user without special rights (root ignores file modes: as `nobody` then)."""
    if os.geteuid() == 0:
        require(shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to drop root's rights")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture
def shared_tmp():
    """A folder every user may enter (pytest's tmp_path is private to its owner), with a readable
    copy of the generated datasets."""
    d = Path(tempfile.mkdtemp(prefix="wsss-perm-"))
    d.chmod(0o755)
    shutil.copytree(os.environ["WSSS_CACHE"], d / "cache")
    _tree_mode(d / "cache", 0o755, 0o644)
    yield d
    for p in [d, *d.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d)


def _env_of(shared: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(shared), "WSSS_CACHE": str(shared / "cache")}


def _tree_mode(root: Path, dirs: int, files: int) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(dirs if p.is_dir() else files)


def test_a_run_folder_nobody_may_write_is_one_line(finished, shared_tmp):
    run = shared_tmp / "run"
    shutil.copytree(finished, run)
    _tree_mode(run, 0o555, 0o444)  # readable, not writable
    before = snapshot(run)
    r = as_other_user([sys.executable, "-m", "wsss_core.cli", "stage", "crf", "--force", "--config", str(CI_YAML),
                       "--run-dir", str(run)], env=_env_of(shared_tmp))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"wsss: error: {run}: not writable (permission "
                                                                   "denied)"], r.stderr
    assert snapshot(run) == before


def test_predict_into_a_folder_nobody_may_write_or_from_one_nobody_may_read(ci_full_run, shared_tmp):
    _, full = ci_full_run
    run = shared_tmp / "run"
    shutil.copytree(full.root, run, ignore=shutil.ignore_patterns("checkpoint.pt", "notebooks"))
    _tree_mode(run, 0o755, 0o644)
    photos = _photos(shared_tmp / "photos")
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o555)
    env = _env_of(shared_tmp)
    cmd = [sys.executable, "-m", "wsss_core.cli", "predict", "--run", str(run)]
    r = as_other_user([*cmd, "--images", str(photos), "--out", str(locked / "masks")], env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"wsss: error: {locked}: not writable (permission denied)"], r.stderr
    photos.chmod(0o311)  # may enter, not list
    writable = shared_tmp / "w"
    writable.mkdir(mode=0o777)
    writable.chmod(0o777)
    r = as_other_user([*cmd, "--images", str(photos), "--out", str(writable / "masks")], env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"wsss: error: {photos}: not readable (permission denied)"], r.stderr
    assert not (writable / "masks").exists() and not (locked / "masks").exists()


def in_small_disk(script: str, mount: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace where `mount` is a 160 MB tmpfs (a disk that can fill)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    require(probe.returncode == 0, f"unshare -rm (a private mount namespace) is not available: {probe.stderr}")
    mount.mkdir(exist_ok=True)
    full = f"set -e\nmount -t tmpfs -o size=160m tmpfs {mount}\n{script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", full], capture_output=True, text=True, timeout=600, env=env)


FILL = 'dd if=/dev/zero of={m}/filler bs=4096 2>/dev/null || true\ntruncate -s -{margin} {m}/filler\n'


def _wsss(args: str) -> str:
    return f"{sys.executable} -m wsss_core.cli {args}"


def test_a_full_disk_mid_stage_is_one_line_keeps_the_rest_and_resumes(finished, tmp_path):
    """The CRF stage fills the disk after a few images: one line naming the file and how to resume, exit 2;
    earlier stages intact; freeing space and rerunning computes only the missing images, and the result
    equals the uninterrupted run's."""
    m, out = tmp_path / "disk", tmp_path / "out"
    out.mkdir()
    args = f"stage crf --config {CI_YAML} --run-dir {m}/run"
    script = (f"cp -a {finished} {m}/run\nrm -r {m}/run/03_crf\n" + FILL.format(m=m, margin=16384) +
              f"set +e\n{_wsss(args)} > {out}/1.out 2> {out}/1.err; echo $? > {out}/1.rc\n"
              f"cp -a {m}/run {out}/after-failure\nrm {m}/filler\n"
              f"{_wsss(args)} > {out}/2.out 2> {out}/2.err; echo $? > {out}/2.rc\ncp -a {m}/run {out}/resumed\n")
    r = in_small_disk(script, m, {**os.environ})
    assert r.returncode == 0, r.stderr
    line = (out / "1.err").read_text().strip().splitlines()
    assert (out / "1.rc").read_text().strip() == "2" and len(line) == 1, line
    assert re.fullmatch(rf"wsss: error: disk full while writing {re.escape(str(m))}/run/03_crf/confident_labels/\S+\.png; "
                        "free space and rerun the same command to resume", line[0]), line
    failed = out / "after-failure"
    for stage in ("00_data", "01_classifier", "01_label_filter", "02_cams"):
        assert snapshot(failed / stage) == snapshot(finished / stage)
    partial = sorted(p.name for p in (failed / "03_crf" / "confident_labels").iterdir())
    everything = sorted(p.name for p in (finished / "03_crf" / "confident_labels").iterdir())
    assert 0 < len(partial) < len(everything) and set(partial) < set(everything)  # no temp files either
    assert (out / "2.rc").read_text().strip() == "0", (out / "2.err").read_text()
    assert f"'computed': {len(everything) - len(partial)}," in (out / "2.out").read_text()
    resumed = out / "resumed" / "03_crf" / "confident_labels"
    for name in everything:
        assert (resumed / name).read_bytes() == (finished / "03_crf" / "confident_labels" / name).read_bytes()


def test_a_full_disk_in_wsss_run_and_wsss_predict_is_one_line(ci_full_run, finished, tmp_path):
    _, full = ci_full_run
    m, out = tmp_path / "disk", tmp_path / "out"
    out.mkdir()
    photos = _photos(tmp_path / "photos", 3)
    run_args = f"run --from crf --to crf --config {CI_YAML} --run-dir {m}/run"
    predict_args = f"predict --run {full.root} --images {photos} --out {m}/masks"
    script = (f"cp -a {finished} {m}/run\nrm -r {m}/run/03_crf\n" + FILL.format(m=m, margin=16384) +
              f"set +e\n{_wsss(run_args)} > {out}/run.out 2> {out}/run.err; echo $? > {out}/run.rc\n"
              f"cp -a {m}/run {out}/run-after\n"
              f"{_wsss(predict_args)} > {out}/predict.out 2> {out}/predict.err; echo $? > {out}/predict.rc\n"
              f"ls -a {m}/masks > {out}/masks.ls 2>&1\n")
    r = in_small_disk(script, m, {**os.environ})
    assert r.returncode == 0, r.stderr
    assert (out / "run.rc").read_text().strip() == "2"
    line = (out / "run.err").read_text().strip().splitlines()  # the stage runs in `wsss run`: its own file
    assert len(line) == 1 and re.fullmatch(rf"wsss: error: disk full while writing {re.escape(str(m))}/run/03_crf/"
                                           r"confident_labels/\S+\.png; free space and rerun the same command to resume",
                                           line[0]), line
    for stage in ("00_data", "01_classifier", "01_label_filter", "02_cams"):
        assert snapshot(out / "run-after" / stage) == snapshot(finished / stage)
    assert (out / "predict.rc").read_text().strip() == "2"
    line = (out / "predict.err").read_text().strip().splitlines()
    assert len(line) == 1 and re.fullmatch(
        rf"wsss: error: disk full while writing {re.escape(str(m))}/masks/p\d\.png after \d of 3 masks; free space "
        r"and rerun with --overwrite \(the masks written are complete\)", line[0]), line
    assert ".wsss-predict.lock" not in (out / "masks.ls").read_text()  # the lock is released
