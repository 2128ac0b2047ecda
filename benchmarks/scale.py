"""How the per-image machinery's cost grows with the number of images.

Synthetic datasets of N train images (square, `--image-size` 432: 186,624
pixels, as many as a 500x375 VOC photo) go through the stages data, cams,
crf and pseudo_masks, each stage in its own process (`wsss stage`), after a
tiny classifier and boundary net (1 epoch on 64-pixel crops: this measures
the per-image stages, not training). For each stage and N it prints seconds
per image (the stage's own time from its manifest, without the interpreter's
start), the process's peak resident memory and the stage folder's disk use
per image; the last line gives the ratios of the largest N to the smallest:

    scale 500->8000: time per image x<T>, peak memory x<M>, disk per image x<D>

time per image: the sum over the four stages; peak memory: the largest of
the four; disk: the sum of their folders. Linear cost and flat memory give
ratios near 1. The datasets are generated once into --work (a few minutes
for 8,000 images; about 40 KB of JPEG and mask per image) and reused.

    .venv/bin/python benchmarks/scale.py                      # 500, 2000, 8000 (hours on 2 CPU cores)
    .venv/bin/python benchmarks/scale.py --sizes 100 400 1600  # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

STAGES = ("data", "cams", "crf", "pseudo_masks")  # measured
ORDER = ("data", "classifier", "label_filter", "cams", "crf", "boundary", "pseudo_masks")  # the others: not measured


def params(n: int, image_size: int, cache: Path) -> dict:
    """The experiment: msrc's CAM and walk settings, tiny training, no evaluation sweeps."""
    return {
        "name": f"scale{n}", "seed": 0,
        "data": {"format": "synthetic", "synthetic": {"seed": 1, "n_train": n, "n_val": 8, "image_size": image_size,
                                                      "cache_dir": str(cache)}},
        "classifier": {"image_size": 64, "epochs": 1, "batch_size": 16},
        "label_filter": {"enabled": False},
        "cams": {"method": "gradcam++", "scales": [1.0, 0.5], "flip": True},
        "crf": {"sweep_images": 0},
        "boundary": {"output_stride": 8, "crop_size": 64, "epochs": 1, "batch_size": 16},
        "pseudo_masks": {"beta": 5.0, "exp_times": 5, "sem_seg_bg_thres": 0.5, "sweep_images": 0},
    }


def run_stage(stage: str, config: Path, run_dir: Path, log: Path) -> int:
    """Run `wsss stage` in a child process; returns its peak resident memory in bytes."""
    cmd = [sys.executable, "-m", "wsss_core.cli", "stage", stage, "--config", str(config), "--run-dir", str(run_dir)]
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, WSSS_BATCH="1"))
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"scale: stage {stage} failed for {config}; see {log}")
    return usage.ru_maxrss * 1024  # KB on Linux


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(n: int, image_size: int, work: Path) -> dict[str, dict[str, float]]:
    """Per stage: seconds per image, peak memory (MB), disk per image (KB)."""
    config = work / f"scale{n}.yaml"
    config.write_text(yaml.safe_dump(params(n, image_size, work / "cache")))
    from wsss_core.config import load_config
    from wsss_core.data.synthetic import ensure_synthetic

    ensure_synthetic(load_config(config).data.synthetic)  # generated once, before (and outside) the measurement
    run_dir = work / f"run{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log = work / f"run{n}.log"
    log.unlink(missing_ok=True)
    out: dict[str, dict[str, float]] = {}
    for stage in ORDER:
        t0 = time.perf_counter()
        peak = run_stage(stage, config, run_dir, log)
        if stage in STAGES:
            folder = next(p for p in run_dir.iterdir() if p.is_dir() and p.name.endswith("_" + stage))
            seconds = json.loads((folder / "manifest.json").read_text())["seconds"]
            out[stage] = {"s_per_image": seconds / n, "peak_mb": peak / 2**20,
                          "kb_per_image": folder_bytes(folder) / n / 1024}
        print(f"  N={n} {stage:<13} {time.perf_counter() - t0:7.1f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--image-size", type=int, default=432)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/.scale"), help="datasets and runs (reused)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    results = {n: measure(n, args.image_size, args.work) for n in sizes}
    print(f"{'stage':<13} {'images':>7} {'s/image':>9} {'peak MB':>8} {'KB/image':>9}")
    for stage in STAGES:
        for n in sizes:
            r = results[n][stage]
            print(f"{stage:<13} {n:>7} {r['s_per_image']:>9.4f} {r['peak_mb']:>8.0f} {r['kb_per_image']:>9.1f}")
    total = {n: (sum(r["s_per_image"] for r in results[n].values()), max(r["peak_mb"] for r in results[n].values()),
                 sum(r["kb_per_image"] for r in results[n].values())) for n in sizes}
    for n in sizes:
        print(f"{'all four':<13} {n:>7} {total[n][0]:>9.4f} {total[n][1]:>8.0f} {total[n][2]:>9.1f}")
    a, b = total[sizes[0]], total[sizes[-1]]
    (args.work / "results.json").write_text(json.dumps({str(n): results[n] for n in sizes}, indent=1))
    print(f"scale {sizes[0]}->{sizes[-1]}: time per image x{b[0] / a[0]:.2f}, peak memory x{b[1] / a[1]:.2f}, "
          f"disk per image x{b[2] / a[2]:.2f}")


if __name__ == "__main__":
    main()
