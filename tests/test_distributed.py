"""Per-image stages under torchrun (2 gloo processes on the CPU) write exactly
the files a single process writes, with equal contents."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from wsss_core.artifacts import CAMS, IR_LABELS, read_kept_ids
from wsss_core.stages import open_run
from wsss_core.config import load_config

from conftest import REPO

CONFIG = REPO / "params" / "ci.yaml"


def torchrun(*args: str, nproc: int) -> subprocess.CompletedProcess:
    """`wsss stage` under torchrun; --standalone lets the launcher pick a free port itself."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "wsss_core.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same threads in every process: bit-equal results
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cams_and_crf_with_two_processes_equal_one(ci_run, tmp_path):
    _, finished = ci_run
    runs = {}
    for nproc in (1, 2):
        root = tmp_path / f"run{nproc}"
        shutil.copytree(finished.root, root)
        shutil.rmtree(root / "02_cams")
        shutil.rmtree(root / "03_crf")
        for stage, folder in (("cams", "02_cams"), ("crf", "03_crf")):
            out = torchrun("stage", stage, "--config", str(CONFIG), "--run-dir", str(root), nproc=nproc).stdout
            assert out.count(f"{folder}: running") == out.count(f"{folder}: done in") == 1  # rank 0 speaks
        runs[nproc] = open_run(root, load_config(CONFIG))
    one, two = runs[1], runs[2]
    kept = read_kept_ids(one)
    assert len(kept) > 4
    for artifact in (CAMS, IR_LABELS):
        assert artifact.ids(one) == artifact.ids(two) == sorted(kept)
        assert not [p for p in artifact.dir(two).iterdir() if p.name.startswith(".")]  # no temp leftovers
    for i in kept:
        a, b = CAMS.read(one, i), CAMS.read(two, i)
        assert np.array_equal(a.keys, b.keys)
        assert np.array_equal(a.cam, b.cam) and np.array_equal(a.high_res, b.high_res)
        assert np.array_equal(IR_LABELS.read(one, i), IR_LABELS.read(two, i))
    for stage in ("cams", "crf"):
        m1, m2 = one.manifest(stage), two.manifest(stage)
        assert m1["status"] == m2["status"] == "done"
        assert m2["metrics"]["computed"] == m1["metrics"]["computed"] == len(kept)
        assert m2["metrics"].get("quality") == m1["metrics"].get("quality")



def test_leave_distributed_destroys_the_process_group(tmp_path):
    """A joined group is destroyed (an undestroyed gloo group can abort the
    interpreter's exit, as on CI once); leaving without a group does nothing;
    `wsss stage` leaves the group it ran in, whether the stage ran or failed."""
    import torch.distributed as dist

    from wsss_core import runtime
    from wsss_core.cli import main

    def join(name: str) -> None:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / name}", rank=0, world_size=1)
        assert dist.is_initialized()

    try:
        runtime.leave_distributed()  # no group: nothing to do
        join("a")
        runtime.leave_distributed(wait=True)
        assert not dist.is_initialized()
        args = ["--config", str(CONFIG), "--run-dir", str(tmp_path / "run")]
        join("b")
        assert main(["stage", "data", *args]) == 0
        assert not dist.is_initialized()
        join("c")
        assert main(["stage", "cams", *args]) == 2  # refused inside the stage: no classifier yet
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
