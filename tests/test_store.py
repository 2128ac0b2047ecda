"""Run store: atomic files, manifests, skip-if-done, refusal on stale upstream,
and a stage killed midway leaving no half file behind."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from wsss_core import stages
from wsss_core.stages import registry
from wsss_core.config import config_from_dict
from wsss_core.store import (
    StaleUpstreamError,
    atomic_write,
    read_json,
    save_npz,
    save_png,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent

TOY = """
import os, signal
import numpy as np
from wsss_core import stages
from wsss_core.store import StageResult, save_npz

def toy_a(cfg, run):
    out = run.make_folder("toy_a")
    n = 0
    for k in range(4):
        p = out / f"part{k}.npz"
        if p.exists():          # resume: finished files are kept
            continue
        data = np.full(200_000, k, dtype=np.float64)
        if os.environ.get("TOY_KILL_AT") == str(k):
            from wsss_core.store import atomic_write
            with atomic_write(p) as tmp:
                tmp.write_bytes(data.tobytes()[: len(data.tobytes()) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        save_npz(p, data=data)
        n += 1
    return StageResult(metrics={"written": n, "lr": cfg.classifier.lr})

def toy_b(cfg, run):
    a = run.make_folder("toy_a")
    total = sum(float(np.load(a / f"part{k}.npz")["data"][0]) for k in range(4))
    return StageResult(metrics={"total": total})

def register():
    stages.register("toy_a", "01_toy_a", ("classifier",))(toy_a)
    stages.register("toy_b", "02_toy_b", ("cams",), ("toy_a",))(toy_b)
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "toy_stages.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(mod_dir))
    import importlib

    import toy_stages

    with registry.scratch():  # the real registry comes back after the test
        importlib.reload(toy_stages).register()
        yield mod_dir


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_old_file_only_on_success(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("garbage")
            raise RuntimeError
    assert read_json(target) == {"a": 1}
    write_json(target, {"a": float("nan"), "b": np.float32(2.5), "c": np.arange(2)})
    assert read_json(target) == {"a": None, "b": 2.5, "c": [0, 1]}


def test_npz_and_png_round_trip(tmp_path):
    save_npz(tmp_path / "c.npz", cam=np.ones((2, 3, 4), np.float16), keys=np.array([3, 5]))
    z = np.load(tmp_path / "c.npz")
    assert z["cam"].dtype == np.float16 and z["keys"].tolist() == [3, 5]
    from PIL import Image

    lab = np.array([[0, 1], [255, 2]], np.uint8)
    save_png(tmp_path / "m.png", lab, palette=np.zeros((256, 3), np.uint8))
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P" and np.array_equal(np.array(im), lab)


def test_skip_if_done_and_rerun_on_param_change(toy, tmp_path):
    cfg = config_from_dict({})
    run = stages.open_run(tmp_path / "run", cfg)
    r1 = stages.run_stage("toy_a", cfg, run)
    assert r1.metrics["written"] == 4 and not r1.skipped
    m = run.manifest("toy_a")
    assert m["status"] == "done" and m["seconds"] >= 0 and m["config"]["classifier"]["lr"] == cfg.classifier.lr
    assert read_json(run.make_folder("toy_a") / "metrics.json") == r1.metrics
    assert (tmp_path / "run" / "config.yaml").is_file()

    r2 = stages.run_stage("toy_a", cfg, run)
    assert r2.skipped and r2.metrics == r1.metrics

    cfg2 = config_from_dict({}, {"classifier.lr": 0.5})
    run2 = stages.open_run(tmp_path / "run", cfg2)
    assert not run2.is_done("toy_a")
    r3 = stages.run_stage("toy_a", cfg2, run2)
    assert not r3.skipped and r3.metrics["lr"] == 0.5
    assert r3.metrics["written"] == 4  # the old parameters' files were cleared, not resumed from


def test_downstream_refuses_stale_upstream_naming_the_change(toy, tmp_path):
    cfg = config_from_dict({})
    run = stages.open_run(tmp_path / "run", cfg)
    with pytest.raises(StaleUpstreamError, match="01_toy_a has not been run"):
        stages.run_stage("toy_b", cfg, run)
    stages.run_stage("toy_a", cfg, run)
    assert stages.run_stage("toy_b", cfg, run).metrics["total"] == 6.0

    # change a parameter toy_a depends on, without rerunning toy_a
    cfg2 = config_from_dict({}, {"classifier.lr": 0.5})
    run2 = stages.open_run(tmp_path / "run", cfg2)
    with pytest.raises(StaleUpstreamError) as e:
        stages.run_stage("toy_b", cfg2, run2)
    msg = str(e.value)
    assert "01_toy_a" in msg and "classifier.lr: 0.001 -> 0.5" in msg and "--from toy_a" in msg

    # a parameter toy_b alone uses: toy_b reruns, toy_a stays done
    cfg3 = config_from_dict({}, {"cams.flip": False})
    run3 = stages.open_run(tmp_path / "run", cfg3)
    assert run3.is_done("toy_a") and not run3.is_done("toy_b")
    assert not stages.run_stage("toy_b", cfg3, run3).skipped

    # after the upstream reruns, downstream is no longer done and reruns
    stages.run_stage("toy_a", cfg2, run2)
    assert not run2.is_done("toy_b")
    assert stages.run_stage("toy_b", cfg2, run2).metrics["total"] == 6.0


def test_an_interrupted_resume_keeps_downstream_done(toy, tmp_path):
    cfg = config_from_dict({})
    run = stages.open_run(tmp_path / "run", cfg)
    stages.run_stage("toy_a", cfg, run)
    stages.run_stage("toy_b", cfg, run)
    # toy_a started again with the same parameters (a re-evaluation, a resume) and Ctrl-C'd
    run.begin("toy_a")
    run.fail("toy_a", KeyboardInterrupt(), "now")
    assert run.why_not_done("toy_a") == "01_toy_a did not finish (status: interrupted)"
    assert stages.run_stage("toy_a", cfg, run).metrics["written"] == 0  # resumed: its files are kept
    assert run.is_done("toy_b")  # so toy_b's inputs are the same files: nothing to redo
    # a forced redo is new outputs: toy_b is stale
    stages.run_stage("toy_a", cfg, run, force=True)
    assert run.why_not_done("toy_b") == "02_toy_b is stale because its input was redone since: 01_toy_a"


def test_failed_stage_is_recorded_and_not_done(toy, tmp_path):
    cfg = config_from_dict({})
    run = stages.open_run(tmp_path / "run", cfg)

    def broken(cfg, run):
        raise ValueError("bad thing")

    import dataclasses

    # replaced inside the toy's scratch registry, which goes with it (monkeypatch would put the toy stage back
    # into the real registry after the scratch one is restored, for every later test of the process)
    stages.STAGES["toy_a"] = dataclasses.replace(stages.STAGES["toy_a"], fn=broken)
    with pytest.raises(ValueError):
        stages.run_stage("toy_a", cfg, run)
    m = run.manifest("toy_a")
    assert m["status"] == "failed" and "bad thing" in m["error"]
    with pytest.raises(StaleUpstreamError, match="did not finish"):
        stages.run_stage("toy_b", cfg, run)


def test_write_killed_midway_leaves_no_half_file_and_rerun_completes(toy, tmp_path):
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(toy)!r})
        import toy_stages; toy_stages.register()
        from wsss_core import stages
        from wsss_core.config import config_from_dict
        cfg = config_from_dict({{}})
        stages.run_stage("toy_a", cfg, stages.open_run({str(run_dir)!r}, cfg))
        """
    )
    env = dict(os.environ, TOY_KILL_AT="2")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # killed by SIGKILL inside the write
    folder = run_dir / "01_toy_a"
    assert (folder / "part0.npz").is_file() and (folder / "part1.npz").is_file()
    assert not (folder / "part2.npz").exists()  # never half-written under its real name
    leftovers = [p for p in folder.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1
    assert json.loads((folder / "manifest.json").read_text())["status"] == "running"

    cfg = config_from_dict({})
    run = stages.open_run(run_dir, cfg)
    assert not run.is_done("toy_a")
    result = stages.run_stage("toy_a", cfg, run)
    assert result.metrics["written"] == 2  # resumed: only the missing parts
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    for k in range(4):
        assert np.load(folder / f"part{k}.npz")["data"].shape == (200_000,)
    assert run.is_done("toy_a")


def test_unknown_stage_is_a_clear_error(tmp_path):
    cfg = config_from_dict({})
    run = stages.open_run(tmp_path / "run", cfg)
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        stages.run_stage("nope", cfg, run)


def test_a_file_with_the_longest_name_a_folder_allows_is_written(tmp_path):
    """A 255-byte name (a photo's, in wsss predict): the temporary name must not be longer than the file's."""
    from wsss_core.store import write_text

    for stem in ("x" * 251, "写" * 83):  # 255 bytes: ASCII, and 3-byte characters (249 + 4)
        path = tmp_path / (stem + ".png")
        write_text(path, "mask")
        assert path.read_text() == "mask" and [p.name for p in tmp_path.iterdir()] == [path.name]
        path.unlink()


def test_a_killed_process_not_yet_reaped_holds_no_lock():
    """A zombie (exited, its parent has not waited for it) does not run: its lock is stale."""
    import socket
    import subprocess
    import sys
    import time

    from wsss_core.store import process_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[-1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)  # exited, not reaped: Popen waits only when asked
    assert not process_alive(child.pid, socket.gethostname())
    assert process_alive(os.getpid(), socket.gethostname())
    child.wait()
    assert not process_alive(child.pid, socket.gethostname())


def test_two_takers_that_find_a_dead_holder_do_not_both_take_the_lock(tmp_path, monkeypatch):
    """The probe's race: A and B both read the lock of a dead process; before, A replaced it, then B deleted
    A's fresh lock and linked its own, and both worked on the folder. Forced here: each taker waits, after
    finding the holder dead, until the other has looked too (or 2 s). Exactly one holds; the other is told
    who; the lock is gone once the holder is done."""
    import socket
    import threading
    import time

    from wsss_core.store import lock as lock_module
    from wsss_core.store.lock import FolderLock, RunLockedError

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".wsss.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                     "token": "old", "started": "then", "command": "wsss run"}))
    both_looked = threading.Barrier(2)
    real = lock_module.process_alive

    def alive(pid, host):
        answer = real(pid, host)
        if pid == dead.pid:
            with contextlib.suppress(threading.BrokenBarrierError):
                both_looked.wait(timeout=2)
        return answer

    monkeypatch.setattr(lock_module, "process_alive", alive)
    holders, refused = [], []

    def take(name):
        try:
            with FolderLock(tmp_path).hold(name):
                holders.append(name)
                time.sleep(0.5)  # the other taker acts meanwhile
        except RunLockedError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take, args=(n,)) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(holders) == 1, holders
    assert len(refused) == 1 and f"in use by pid {os.getpid()}" in refused[0] and f"({holders[0]})" in refused[0]
    assert not (tmp_path / ".wsss.lock").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no private lock files left either
