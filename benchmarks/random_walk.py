"""Random walk: ours (sparse transition applied 2^exp_times times) against the
dense method (IRNet's: N x N transition matrix squared exp_times times), on
the same synthetic input, from one run of this script.

Input: a stride-4 map of an image of 500x375 (125 x 94 = 11,750 pixels) and
of 250x188, 21 CAM-like channels (smooth Gaussian blobs, max 1) and a boundary
map with a few soft curves; radius 5, beta 10, exp_times 8 (T^256), float32.
The dense method uses the same affinities (`affinity_from_boundary`, which
both share), put in a dense matrix with ones on the diagonal, raised to beta,
column-normalised in place, squared exp_times times, then x @ T.

Each method runs in its own fresh 'spawn' child process (default torch
threads), which times it (ours: best of 3; dense: best of `--dense-repeats`,
1 at 500x375) and reports its peak RSS (getrusage RUSAGE_SELF ru_maxrss at
the end). Two baselines are subtracted from that peak: (a) the peak of an
idle child that imported the same modules and received the same inputs;
(b) the child's own RSS after one warm-up run of the same method on a
16 x 16 map (kernels loaded, thread pool started), i.e. the working memory
of the computation; the ratio in the last line uses (b). This parent process
only uses numpy, so the children inherit no large RSS.

    .venv/bin/python benchmarks/random_walk.py [--sizes 500x375,250x188] [--dense-repeats 1]

The last line reads `random walk 500x375: speedup <N>x, memory <M>x, max diff <D>`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

RADIUS, BETA, EXP_TIMES, CLASSES = 5, 10.0, 8, 21


# --------------------------------------------------------------------------- input (numpy only)
def synthetic_case(height: int, width: int, k: int = CLASSES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CAM-like maps (k, h, w) in [0, 1] and a boundary map (h, w) at stride 4."""
    h, w = (height + 3) // 4, (width + 3) // 4
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cams = np.zeros((k, h, w))
    for c in range(k):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            sy, sx = rng.uniform(0.05, 0.25) * h, rng.uniform(0.05, 0.25) * w
            blob = np.exp(-((yy - cy) ** 2 / (2 * sy ** 2) + (xx - cx) ** 2 / (2 * sx ** 2)))
            cams[c] += rng.uniform(0.3, 1.0) * blob
        cams[c] = np.maximum(cams[c] - 0.05, 0)
        cams[c] /= cams[c].max()
    dist = []
    for _ in range(3):  # ellipses around objects
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        rad = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        dist.append(np.abs(rad - 1.0) * min(ry, rx))
    for _ in range(2):  # wavy lines across the image
        y0, amp, freq, ph = rng.uniform(0.2, 0.8) * h, rng.uniform(2, 8), rng.uniform(0.03, 0.1), rng.uniform(0, 6.3)
        dist.append(np.abs(yy - (y0 + amp * np.sin(freq * xx + ph))))
    d = np.min(dist, axis=0)
    boundary = np.clip(np.exp(-d ** 2 / 2.0) + 0.05 * rng.random((h, w)), 0, 1)
    return cams.astype(np.float32), boundary.astype(np.float32)


# --------------------------------------------------------------------------- the two methods (children)
def dense_random_walk(cams, boundary, radius=RADIUS, beta=BETA, exp_times=EXP_TIMES):
    """IRNet's method: dense A (N, N) -> A^beta -> column-normalised T -> T^(2^exp_times) -> x @ T."""
    import torch

    from wsss_core.affinity import affinity_from_boundary, half_offsets

    with torch.no_grad():
        k, h, w = cams.shape
        n = h * w
        a = affinity_from_boundary(boundary[None, None], radius)[0]  # (D, h, w), same as ours
        t = torch.zeros(n, n, dtype=cams.dtype)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        for d, (dy, dx) in enumerate(half_offsets(radius)):
            ok = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            src = (ys * w + xs)[ok]
            dst = ((ys + dy) * w + xs + dx)[ok]
            t[src, dst] = a[d][ok]
            t[dst, src] = a[d][ok]
        t.diagonal().fill_(1.0)
        t.pow_(beta)
        t.div_(t.sum(0, keepdim=True))
        for _ in range(exp_times):
            t = t @ t
        x = (cams * (1 - boundary)).reshape(k, n)
        return (x @ t).reshape(k, h, w)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KB


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _child(method: str, cams: np.ndarray, boundary: np.ndarray, repeats: int, conn) -> None:
    import torch

    from wsss_core.random_walk import random_walk

    def run(x, b):
        return random_walk(x, b, RADIUS, BETA, EXP_TIMES) if method == "ours" else dense_random_walk(x, b)

    x, b = torch.from_numpy(cams), torch.from_numpy(boundary)
    if method != "idle":  # load the kernels, start the thread pool (fixed costs) on a 16 x 16 map
        run(x[:, :16, :16].clone(), b[:16, :16].clone())
    warm = _rss_mb()
    times, out = [], None
    for _ in range(repeats if method != "idle" else 0):
        t0 = time.perf_counter()
        out = run(x, b)
        times.append(time.perf_counter() - t0)
    conn.send({"times": times, "peak": _peak_rss_mb(), "warm": warm, "out": None if out is None else out.numpy(),
               "threads": torch.get_num_threads()})
    conn.close()


def run_child(method: str, cams: np.ndarray, boundary: np.ndarray, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(method, cams, boundary, repeats, send))
    p.start()
    send.close()
    res = recv.recv()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{method} child exited with {p.exitcode}")
    return res


def normalised(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    top = a.max()
    return a / top if top > 0 else a


# --------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="250x188,500x375", help="image sizes WxH (the stride-4 maps are a quarter)")
    ap.add_argument("--dense-repeats", type=int, default=None, help="dense runs (default: 3 if N < 5000 else 1)")
    args = ap.parse_args(argv)
    print(f"radius {RADIUS}, beta {BETA:g}, exp_times {EXP_TIMES} (T^{2 ** EXP_TIMES}), {CLASSES} channels, float32")
    print("memory: peak RSS (ru_maxrss, RUSAGE_SELF) of a fresh spawn child per method, minus (a) the peak RSS of "
          "an idle child that imported torch + wsss_core and received the same inputs, and (b) the child's own RSS "
          "(VmRSS) after one warm-up run of its method on a 16 x 16 map, just before the timed runs")
    last = ""
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        cams, boundary = synthetic_case(height, width)
        k, h, w = cams.shape
        n = h * w
        dense_repeats = args.dense_repeats or (3 if n < 5000 else 1)
        idle = run_child("idle", cams, boundary, 0)
        ours = run_child("ours", cams, boundary, 3)
        dense = run_child("dense", cams, boundary, dense_repeats)
        t_ours, t_dense = min(ours["times"]), min(dense["times"])
        idle_ours, idle_dense = ours["peak"] - idle["peak"], dense["peak"] - idle["peak"]
        work_ours, work_dense = ours["peak"] - ours["warm"], dense["peak"] - dense["warm"]
        diff = float(np.abs(normalised(ours["out"]) - normalised(dense["out"])).max())
        print(f"\n{size} (stride-4 map {w} x {h} = {n:,} pixels, {k} channels, torch threads {ours['threads']}):")
        for name, r, t in (("ours ", ours, t_ours), ("dense", dense, t_dense)):
            print(f"  {name}: {t:9.3f} s (best of {len(r['times'])}: {', '.join(f'{v:.3f}' for v in r['times'])}); "
                  f"peak RSS {r['peak']:.1f} MB = idle + {r['peak'] - idle['peak']:.1f} MB "
                  f"= warmed-up + {r['peak'] - r['warm']:.1f} MB")
        print(f"  idle child peak RSS {idle['peak']:.1f} MB; "
              f"one dense N x N float32 matrix: {n * n * 4 / 2 ** 20:.1f} MB")
        speed = t_dense / t_ours
        mem_idle = idle_dense / max(idle_ours, 1e-3)
        mem = work_dense / max(work_ours, 1e-3)
        print(f"  memory ratio over the idle child: {mem_idle:.1f}x (includes ~30 MB of torch kernels and thread "
              f"pools that any first use loads)")
        print(f"  speedup {speed:.1f}x, memory {mem:.1f}x (peak over the warmed-up child), "
              f"max abs diff of max-normalised outputs {diff:.1e}")
        last = f"random walk {size}: speedup {speed:.1f}x, memory {mem:.1f}x, max diff {diff:.1e}"
    print(last)


if __name__ == "__main__":
    main()
