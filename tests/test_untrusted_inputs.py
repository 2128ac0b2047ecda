"""Nothing read from a run folder or a dataset runs code or writes outside its place.

- A code-running pickle planted in every file the project loads (classifier,
  its checkpoint, the label filter's checkpoint, the boundary net and its
  checkpoint, both segmenters) runs nothing and is refused with one line
  naming the file, exit 2.
- Image ids that would leave their folder (`..`, absolute paths, `\\`,
  control characters, whitespace, `/` in the VOC layout) are refused with the
  file and line; a path built from an id cannot leave its folder even when
  the id got past the readers.
"""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_core import cli, stages
from wsss_core.artifacts import CAMS, CONFIDENT_LABELS, PSEUDO_MASKS
from wsss_core.config import load_config
from wsss_core.data import DataError, open_dataset
from wsss_core.data.ids import check_image_id, id_problem, path_inside
from wsss_core.store import FileError, read_torch

from conftest import REPO
from fixtures import make_lid, make_voc, snapshot, voc_cfg

CI_YAML = REPO / "params" / "ci.yaml"


class _RunsCode:
    """Unpickling this calls os.system: what a hostile model file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """A torch file shaped like ours whose pickle runs a command when loaded without weights_only."""
    torch.save({"state_dict": _RunsCode(marker), "format": "x"}, path)


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsss: error: "), err
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture
def full(ci_full_run, tmp_path):
    """A private copy of a finished ci run (every stage done)."""
    _, run = ci_full_run
    root = tmp_path / "run"
    shutil.copytree(run.root, root)
    return root


def _unfinish(root: Path, folder: str, drop_model: bool) -> None:
    """Mark a stage failed (so a rerun resumes from its checkpoint) and drop its model."""
    m = root / folder / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["status"] = "failed"
    m.write_text(json.dumps(manifest))
    if drop_model:
        (root / folder / "model.pt").unlink(missing_ok=True)


# (file to plant, stage to mark failed first (resume) or None, argv after the command word, what it is)
PLANTS = {
    "classifier model": ("01_classifier/model.pt", None, ["stage", "cams", "--force"], "classifier model"),
    "classifier checkpoint": ("01_classifier/checkpoint.pt", "01_classifier", ["stage", "classifier"],
                              "training checkpoint"),
    "label filter checkpoint": ("01_label_filter/checkpoint.pt", "01_label_filter", ["stage", "label_filter"],
                                "training checkpoint"),
    "boundary model": ("04_boundary/model.pt", None, ["stage", "pseudo_masks", "--force"], "boundary model"),
    "boundary checkpoint": ("04_boundary/checkpoint.pt", "04_boundary", ["stage", "boundary"],
                            "training checkpoint"),
    "segmenter": ("06_segmentation/model.pt", None, ["stage", "predict", "--force"], "segmenter"),
    "fully supervised segmenter": ("06_bound/model.pt", None, ["stage", "predict", "--force"],
                                   "segmenter"),
    "segmenter checkpoint": ("06_segmentation/checkpoint.pt", "06_segmentation", ["stage", "segmentation"],
                             "training checkpoint"),
}


@pytest.mark.parametrize("what", list(PLANTS))
def test_a_planted_pickle_runs_nothing_and_is_one_line(what, full, tmp_path, capsys):
    rel, unfinish, args, kind = PLANTS[what]
    marker = tmp_path / "code-ran"
    target = full / rel
    if unfinish:
        _unfinish(full, unfinish, drop_model=True)
    plant(target, marker)
    capsys.readouterr()
    code = cli.main([args[0], args[1], "--config", str(CI_YAML), "--run-dir", str(full), *args[2:]])
    line = one_error_line(capsys)
    assert not marker.exists(), "the planted pickle ran code"
    assert code == 2
    assert str(target) in line and f"refused to load this {kind}" in line and "posix.system" in line, line


def test_wsss_predict_and_the_cam_inspector_refuse_a_planted_model(full, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    plant(full / "06_segmentation" / "model.pt", marker)
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photos / "a.png")
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(full), "--images", str(photos), "--out", str(tmp_path / "masks")]) == 2
    assert f"{full / '06_segmentation' / 'model.pt'}: refused to load this segmenter" in one_error_line(capsys)
    assert not (tmp_path / "masks").exists()

    plant(full / "01_classifier" / "model.pt", marker)
    from wsss_core.widgets import CamInspector

    cfg = load_config(CI_YAML)
    with pytest.raises(FileError, match=re.escape(f"{full / '01_classifier' / 'model.pt'}: refused to load")):
        CamInspector(cfg, stages.open_run(full, cfg))
    assert not marker.exists()


def test_read_torch_loads_what_wsss_writes_and_names_a_truncated_file(tmp_path):
    p = tmp_path / "ok.pt"
    torch.save({"a": torch.arange(3), "meta": {"name": "x", "sizes": [1, 2.5], "flag": None}}, p)
    blob = read_torch(p, "model")
    assert blob["meta"] == {"name": "x", "sizes": [1, 2.5], "flag": None} and blob["a"].tolist() == [0, 1, 2]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(p.read_bytes()[:40])
    with pytest.raises(FileError, match=re.escape(f"{bad}: cannot read this model")):
        read_torch(bad, "model")
    with pytest.raises(FileError, match=re.escape(f"{tmp_path / 'none.pt'}: model not found")):
        read_torch(tmp_path / "none.pt", "model")


def test_checkpoints_resume_exactly_with_weights_only(tmp_path):
    """The fit loop's checkpoint holds RNG states as tensors and plain values:
    a resumed training equals an uninterrupted one, bit for bit."""
    import random

    from wsss_core.train import _rng_state, _set_rng_state

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = _rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
                np.random.randn(2).tolist())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    _set_rng_state(read_torch(tmp_path / "rng.pt", "rng"))
    again = (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
             np.random.randn(2).tolist())
    assert again == expected


def test_no_code_loads_without_weights_only():
    """A grep over the package: no torch.load without weights_only, no pickle.load(s)."""
    offenders = []
    for p in sorted((REPO / "wsss_core").rglob("*.py")):
        text = p.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|yaml\.unsafe_load|"
                         r"Loader=yaml\.(Full|Unsafe)?Loader\b|(?<![.\w])eval\(|marshal\.loads", line):
                offenders.append(f"{p.relative_to(REPO)}:{n}: {line.strip()}")
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{p.relative_to(REPO)}: {m.group(0)}")
    assert offenders == []
    torch_loads = [p for p in (REPO / "wsss_core").rglob("*.py") if "torch.load(" in p.read_text()]
    assert [p.relative_to(REPO).as_posix() for p in torch_loads] == ["wsss_core/store/files.py"]


# --------------------------------------------------------------------------- image ids
@pytest.mark.parametrize("bad, problem", [
    ("../../../../elsewhere/a", "contains '/'"),
    ("/etc/passwd", "is an absolute path"),
    ("a\\b", "contains '\\'"),
    ("my image", "contains whitespace"),
    ("tab\there", "contains a control character"),
    ("nul\x00", "contains a control character"),
    ("new\nline", "contains a control character"),
    (".hidden", "starts with '.'"),
    ("..", "'..'"),
    ("", "is empty"),
])
def test_ids_that_are_not_plain_file_names_are_refused(bad, problem):
    assert problem in id_problem(bad)
    with pytest.raises(DataError) as e:
        check_image_id(bad, "list.txt: line 3")
    assert str(e.value) == f"list.txt: line 3: image id {bad!r} {id_problem(bad)}"


@pytest.mark.parametrize("ok", ["2007_000032", "a-b_c.d", "ILSVRC2012_val_00000001", "ünïcode"])
def test_plain_ids_pass(ok):
    assert id_problem(ok) is None and check_image_id(ok, "x") == ok


def test_lid_ids_may_have_folders_but_never_leave_them():
    assert id_problem("n02672831/n02672831_10026", subfolders=True) is None
    for bad, problem in [("n0/../../x", "'..'"), ("/abs/x", "absolute"), ("a//b", "empty"), ("a\\b", "'\\'"),
                         ("a/.b", "starts with '.'")]:
        assert problem in id_problem(bad, subfolders=True), bad


def test_path_inside_refuses_what_would_leave_the_folder(tmp_path):
    assert path_inside(tmp_path, "a", ".png") == tmp_path / "a.png"
    assert path_inside(tmp_path, "x/y", ".JPEG") == tmp_path / "x" / "y.JPEG"
    assert path_inside(tmp_path, "..", ".png") == tmp_path / "...png"  # a strange name, but inside
    for escape, suffix in (("../a", ".png"), ("x/../../a", ".png"), ("/etc/passwd", ""), ("..", ""), ("", "")):
        with pytest.raises(DataError, match="leads outside"):
            path_inside(tmp_path, escape, suffix)


def test_an_escaping_id_in_the_lists_is_refused_with_file_and_line(tmp_path, capsys):
    """The probe's case: `../../../../elsewhere/a` in train.txt and the labels CSV,
    the image present there. validate refuses it; `wsss run` writes nothing anywhere."""
    root = make_voc(tmp_path / "data")
    evil = "../../../../elsewhere/a"
    target = (root / "JPEGImages" / f"{evil}.jpg").resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "JPEGImages" / "a1.jpg", target)
    lst = root / "ImageSets" / "Segmentation" / "train.txt"
    lst.write_text(lst.read_text() + f"{evil}\n")
    csv = root / "image_labels_train.csv"
    csv.write_text(csv.read_text() + f"{evil},cat\n")
    cfg = tmp_path / "x.yaml"
    cfg.write_text(f"name: x\ndata:\n  format: voc\n  root: {root}\nclassifier:\n  image_size: 32\n")
    before = sorted(p for p in target.parent.rglob("*"))
    for argv in (["validate", "--config", str(cfg)],
                 ["run", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--to", "cams"]):
        capsys.readouterr()
        assert cli.main(argv) == 2
        assert one_error_line(capsys) == (f"wsss: error: {lst}: line 5: image id {evil!r} contains '/' "
                                          "(ids are file names, without folders, in this layout)")
    assert sorted(p for p in target.parent.rglob("*")) == before and not (tmp_path / "run").exists()


def test_whitespace_in_an_id_is_refused_not_cut(tmp_path):
    """`my image` used to become `my`, and the error then blamed the CSV."""
    root = make_voc(tmp_path / "data", splits={"train": ["a0", "a1"], "val": ["b0"]})
    lst = root / "ImageSets" / "Segmentation" / "train.txt"
    lst.write_text("a0\nmy image\n")
    with pytest.raises(DataError) as e:
        open_dataset(voc_cfg(root), validate=False)
    assert str(e.value) == f"{lst}: line 2: image id 'my image' contains whitespace " \
                           "(ids name files; rename the file and its entry)"
    lst.write_text("  a0 \r\na1\t\n")  # spaces around an id (and CRLF) are not part of it
    assert open_dataset(voc_cfg(root), validate=False).ids("train") == ["a0", "a1"]


def test_an_escaping_id_in_the_csv_alone_is_refused(tmp_path):
    root = make_voc(tmp_path / "data")
    csv = root / "image_labels_train.csv"
    csv.write_text(csv.read_text() + "../x,cat\n")
    with pytest.raises(DataError, match=re.escape(f"{csv}: line 6: image id '../x' contains '/'")):
        open_dataset(voc_cfg(root), validate=False)


def test_lid_entries_that_leave_the_image_folder_are_refused(tmp_path):
    from wsss_core.config import DataConfig

    train = [["n0/../../../outside/x", [1]], ["n02691156/n02691156_1", [2]]]
    root = make_lid(tmp_path / "lid", train=[["n02691156/n02691156_1", [2]]])
    (root / "train.json").write_text(json.dumps(train))
    with pytest.raises(DataError) as e:
        open_dataset(DataConfig(format="lid", root=str(root)), validate=False)
    assert str(e.value) == (f"{root / 'train.json'}: entry 0: image id 'n0/../../../outside/x' has an empty, "
                            "'.' or '..' path component (it would leave its folder)")


def test_a_run_never_writes_outside_its_folders_even_for_an_id_that_got_through(ci_run, tmp_path):
    """Defence in depth: the per-image artifacts build their paths with path_inside."""
    cfg, _ = ci_run
    run = stages.open_run(tmp_path / "run", cfg)
    for artifact in (CAMS, CONFIDENT_LABELS, PSEUDO_MASKS):
        with pytest.raises(DataError, match="leads outside"):
            artifact.path(run, "../../escaped")
        with pytest.raises(DataError, match="leads outside"):
            artifact.write(run, "../../../escaped", np.zeros((2, 2), np.uint8))
    assert not any(tmp_path.rglob("escaped*"))


# --------------------------------------------------------------------------- hostile run folders
def _json_list_manifest(root: Path) -> None:
    (root / "06_segmentation" / "manifest.json").write_text("[1, 2, 3]")


def _manifest_with_wrong_types(root: Path) -> None:
    m = root / "06_segmentation" / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["upstream"] = ["data"]
    m.write_text(json.dumps(manifest))


def _manifest_with_text_seconds(root: Path) -> None:
    m = root / "06_segmentation" / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["seconds"] = "abc"
    m.write_text(json.dumps(manifest))


def _deep_manifest(root: Path) -> None:
    (root / "06_segmentation" / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)


def _model_with_impossible_metadata(root: Path) -> None:
    p = root / "06_segmentation" / "model.pt"
    blob = torch.load(p, weights_only=True)
    blob["segmenter"]["output_stride"] = 3
    torch.save(blob, p)


RUN_FOLDER_CASES = {
    "manifest is a JSON list": (_json_list_manifest, "06_segmentation/manifest.json: not a manifest written by "
                                "wsss (a JSON list, not an object); rerun the stage (wsss run --force segmentation)"),
    "manifest field of the wrong type": (_manifest_with_wrong_types, "06_segmentation/manifest.json: not a manifest "
                                         "written by wsss ('upstream' is a list, not a dict)"),
    "manifest seconds not a number": (_manifest_with_text_seconds, "06_segmentation/manifest.json: not a manifest "
                                      "written by wsss ('seconds' is a str, not a number)"),
    "manifest nested too deeply": (_deep_manifest, "06_segmentation/manifest.json: not valid JSON (nested too "
                                   "deeply); rerun the stage that wrote it"),
    "model metadata no model has": (_model_with_impossible_metadata, "06_segmentation/model.pt: cannot rebuild this "
                                    "segmenter from it (ValueError: output_stride must be 8 or 16, got 3)"),
}


@pytest.mark.parametrize("case", list(RUN_FOLDER_CASES))
def test_a_damaged_run_folder_is_one_line(case, full, tmp_path, capsys):
    damage, message = RUN_FOLDER_CASES[case]
    damage(full)
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photos / "a.png")
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(full), "--images", str(photos), "--out", str(tmp_path / "masks")]) == 2
    line = one_error_line(capsys)
    assert f"{full}/{message}" in line, line
    assert not (tmp_path / "masks").exists()


def test_a_stage_folder_linked_outside_the_run_is_never_written_or_cleared(full, tmp_path, capsys):
    """The probe's case: 07_predict a symbolic link to a folder of the user's; --force predict deleted it."""
    victim = tmp_path / "victim"
    shutil.move(str(full / "07_predict"), victim)
    (victim / "precious.txt").write_text("mine")
    (full / "07_predict").symlink_to(victim)
    before = sorted(p.relative_to(victim) for p in victim.rglob("*"))
    capsys.readouterr()
    assert cli.main(["stage", "predict", "--force", "--config", str(CI_YAML), "--run-dir", str(full)]) == 2
    assert one_error_line(capsys) == (f"wsss: error: {full / '07_predict'}: leads outside the run folder {full} "
                                      "(a symbolic link?); remove the link and rerun")
    assert sorted(p.relative_to(victim) for p in victim.rglob("*")) == before
    assert (victim / "precious.txt").read_text() == "mine"


def test_an_executed_notebook_linked_outside_the_run_is_never_written(full, tmp_path, capsys):
    """The probe's case: notebooks/08_report.ipynb a link to the user's file; --force report replaced it."""
    victim = tmp_path / "mine.ipynb"
    victim.write_text("mine")
    nb = full / "notebooks" / "08_report.ipynb"
    nb.parent.mkdir(exist_ok=True)
    nb.unlink(missing_ok=True)
    nb.symlink_to(victim)
    before = snapshot(full)
    capsys.readouterr()
    assert cli.main(["run", "--force", "report", "--config", str(CI_YAML), "--run-dir", str(full)]) == 2
    assert one_error_line(capsys) == (f"wsss: error: {nb}: leads outside the run folder {full} "
                                      "(a symbolic link?); remove the link and rerun")
    assert victim.read_text() == "mine" and snapshot(full) == before


@pytest.mark.parametrize("command", [["stage", "predict", "--force"], ["run", "--force", "predict", "--no-draw"]])
def test_a_damaged_manifest_is_repaired_by_forcing_its_stage(command, full, capsys):
    """The error says 'rerun the stage that wrote it'; forcing that stage must then work (it failed
    with the same line), and the other stages stay as they were."""
    m = full / "07_predict" / "manifest.json"
    m.write_text(m.read_text()[:300])
    others = {k: v for k, v in snapshot(full).items()
              if not k.startswith(("07_predict", "08_report", "notebooks", "config.yaml"))}  # rewritten by a stage
    capsys.readouterr()
    assert cli.main(["stage", "predict", "--config", str(CI_YAML), "--run-dir", str(full)]) == 2
    assert "07_predict/manifest.json: not valid JSON" in one_error_line(capsys)
    assert cli.main(command + ["--config", str(CI_YAML), "--run-dir", str(full)]) == 0
    assert json.loads(m.read_text())["status"] == "done"
    assert {k: v for k, v in snapshot(full).items() if k in others} == others


def test_a_lid_list_nested_too_deeply_is_one_line(tmp_path):
    from wsss_core.config import DataConfig

    root = make_lid(tmp_path / "lid")
    (root / "train.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError) as e:
        open_dataset(DataConfig(format="lid", root=str(root)), validate=False)
    assert str(e.value) == f"{root / 'train.json'}: cannot read image list (nested too deeply)"
