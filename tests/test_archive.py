"""`wsss archive`: a run's records and scores without its images and models, which `wsss compare` reads
exactly like the run, and which nothing can run from."""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from wsss_core import archive, cli, stages
from wsss_core.compare import compare_runs, comparison_table
from wsss_core.store import FileError

from conftest import FIRST_HALF


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_compare_reads_an_archive_as_it_reads_the_run(ci_full_run, tmp_path, capsys):
    _, run = ci_full_run
    out = tmp_path / "run"  # the run's own folder name, so the rows are named alike
    assert cli.main(["archive", str(run.root), "--out", str(out)]) == 0
    assert f"archived {run.root} into {out}" in capsys.readouterr().out
    kept = _files(out)
    # nothing the run made: no image, mask, CAM, model or notebook; every score file and record it kept
    assert not [f for f in kept if f.endswith((".png", ".pt", ".ipynb", ".html"))]
    assert not [f for f in kept if f.endswith(".npz") and "/scores/" not in f]
    scores = {f for f in _files(run.root) if "/scores/" in f and f.endswith(".npz")}
    assert scores and scores <= kept
    manifests = {f for f in _files(run.root) if f.endswith("/manifest.json")}
    assert manifests == {f for f in kept if f.endswith("/manifest.json")}
    for f in kept - {"archive.json"}:
        assert (out / f).read_bytes() == (run.root / f).read_bytes(), f
    size = sum((out / f).stat().st_size for f in kept)
    assert size < sum((run.root / f).stat().st_size for f in _files(run.root)) / 10
    # the same table: every evaluation's mIoU with its interval, and the stage times
    whole, kept_only = compare_runs([run.root]), compare_runs([out])
    assert kept_only.evaluations == whole.evaluations and len(whole.evaluations) >= 8
    assert comparison_table(kept_only) == comparison_table(whole)
    assert kept_only.seconds == whole.seconds


def test_only_the_stages_done_with_the_runs_parameters_are_archived(ci_run, tmp_path):
    _, run = ci_run  # data .. crf done, the rest never run
    out = archive.archive_run(run.root, tmp_path / "first-half")
    folders = {p.name for p in out.iterdir() if p.is_dir()}
    assert folders == {stages.stage(n).spec.folder for n in FIRST_HALF}
    assert [e.split("/")[0] for e in compare_runs([out]).evaluations] == \
        [e.split("/")[0] for e in compare_runs([run.root]).evaluations]


def test_nothing_runs_from_an_archive(ci_full_run, ci_config, tmp_path, capsys):
    _, run = ci_full_run
    out = archive.archive_run(run.root, tmp_path / "kept")
    before = {f: (out / f).read_bytes() for f in _files(out)}
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (90, 120, 30)).save(photos / "a.png")
    cases = [
        (["run", "--config", str(ci_config), "--run-dir", str(out), "--force", "report"], "running a stage"),
        (["stage", "report", "--config", str(ci_config), "--run-dir", str(out)], "running a stage"),
        (["sweep", "--config", str(ci_config), "--run-dir", str(tmp_path / "sw"), "--reuse", str(out),
          "--grid", "predict.tta_flip=false"], "--reuse"),
        (["predict", "--run", str(out), "--images", str(photos), "--out", str(tmp_path / "masks")],
         "wsss predict"),
        (["archive", str(out), "--out", str(tmp_path / "again")], "is an archive already"),
    ]
    for argv, says in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (argv, err)
        if argv[0] != "archive":
            assert "is an archive of a run's results (wsss archive)" in err
    assert {f: (out / f).read_bytes() for f in _files(out)} == before
    assert not (tmp_path / "masks").exists() and not (tmp_path / "again").exists()


def test_bad_destinations_are_one_line_and_write_nothing(ci_run, tmp_path, capsys):
    _, run = ci_run
    (tmp_path / "taken").mkdir()
    cases = [(tmp_path / "taken", "already exists"), (run.root / "inside", "inside the run"),
             (run.root, "already exists")]
    for out, says in cases:
        assert cli.main(["archive", str(run.root), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    assert not (run.root / "inside").exists() and not list((tmp_path / "taken").iterdir())
    assert cli.main(["archive", str(tmp_path / "taken"), "--out", str(tmp_path / "x")]) == 2
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err


def test_a_failed_archive_leaves_nothing_and_the_next_one_completes(ci_run, tmp_path, monkeypatch):
    _, run = ci_run
    real, calls = shutil.copyfile, []

    def failing(src, dst, *a, **k):
        calls.append(src)
        if len(calls) == 4:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", failing)
    out = tmp_path / "kept"
    with pytest.raises(FileError, match="kept"):
        archive.archive_run(run.root, out)
    assert not out.exists() and len(calls) == 4
    monkeypatch.setattr(shutil, "copyfile", real)
    archive.archive_run(run.root, out)
    assert sorted(os.listdir(tmp_path)) == ["kept"]  # the killed attempt's staging folder is gone too
    kept, whole = compare_runs([out]).miou, compare_runs([run.root]).miou
    assert {e: list(r.values()) for e, r in kept.items()} == {e: list(r.values()) for e, r in whole.items()}
