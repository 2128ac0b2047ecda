"""How far from this machine's limit each stage runs: FLOPs per image, seconds
per image, GFLOP/s and their fraction of a float32 matmul's FLOP/s, and whether
each training loader keeps up with its model's step.

The work of each stage is `stage_costs.StageWork`'s (random weights, a real
photo resized to `--size`, one optimizer step on `--batch` crops for the
trained stages); its time is the best of `--repeats` after a warm-up.
FLOPs per image:
- model stages (classifier, cams, boundary, segmentation, predict and the
  boundary map of pseudo_masks): torch's `FlopCounterMode` around the same
  callable that is timed (forward + backward + SGD step for training). It
  counts convolutions and matrix products only: batch norm, activations,
  pooling, interpolation, softmax, losses and the optimizer (elementwise,
  memory-bound work) add nothing. Depthwise convolutions are counted right
  in the forward pass, but two of torch's formulas are replaced: the backward
  of a grouped convolution, whose weight gradient torch counts as a dense
  convolution (x channels: x16 for a 16-channel depthwise conv, so its forward
  + backward x6; lite0's whole training step x12-15), and a sparse x dense
  product, which torch counts as dense (2 N^2 K for an N x N CSR matrix).
  Each model is checked once: in one forward pass the counted convolution and
  linear FLOPs must equal the textbook 2 N Cout (Cin / groups) kh kw Ho Wo of
  its Conv2d and Linear modules.
- the random walk (`walk_flops`, its matrix's exact entries `transition_nnz`)
  and the dense CRF (`crf_flops`, read from pydensecrf's densecrf C++ source:
  densecrf.cpp, pairwise.cpp, permutohedral.cpp; its lattice sizes from
  `lattice_vertices` on the photo): by formula.
Peak: a float32 (and bfloat16) `--peak-size`^2 matmul in this process with
the same threads, best of `--peak-repeats`; fraction of peak = achieved FLOP/s
/ float32 matmul FLOP/s. Loaders: the training items per second of one
process (read, decode, augment, to tensor; `benchmarks/loader.py`'s way),
with the real masks standing in for the confident labels and pseudo masks
(the same PNG label maps), against the step's images per second.

    .venv/bin/python benchmarks/pipeline_speed.py --config params/msrc.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop, conv_flop_count

from loader import best_rate
from stage_costs import STAGES, TRAINED, StageWork, add_arguments, best_seconds, load_photo

aten = torch.ops.aten


# --------------------------------------------------------------------------- counting
@dataclasses.dataclass
class Counted:
    """FLOPs of one call: `flops` dense convolutions and products (grouped-conv backward
    recounted), `sparse_flops` sparse x dense products (2 nnz columns), `torch_flops` what
    torch's own formulas give for all of them, `by_op` the dense FLOPs per aten op."""

    flops: int
    sparse_flops: int
    torch_flops: int
    by_op: dict[str, int]


def counted_flops(fn: Callable[[], object]) -> Counted:
    """Run `fn` once under `FlopCounterMode` with groups-aware conv backward and sparse-aware mm."""
    side = {"sparse": 0, "torch": 0}

    def conv_backward(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                      output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
        side["torch"] += conv_backward_flop.__wrapped__(grad_out_shape, x_shape, w_shape, bias, stride, padding,
                                                        dilation, transposed, output_padding, groups, output_mask,
                                                        out_shape)
        forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
        return forward * (int(output_mask[0]) + int(output_mask[1]))  # grad input and grad weight: a forward each

    def mm(a: torch.Tensor, b: torch.Tensor, *args, out_val=None, **kwargs) -> int:
        dense = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        side["torch"] += dense
        if a.layout == torch.strided and b.layout == torch.strided:
            return dense
        side["sparse"] += 2 * a._nnz() * b.shape[1] if a.layout != torch.strided else 2 * b._nnz() * a.shape[0]
        return 0

    mm._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes the tensors, not their shapes
    with FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: conv_backward, aten.mm: mm}) as m:
        fn()
    by_op = {str(k): int(v) for k, v in m.get_flop_counts()["Global"].items()}
    total = sum(by_op.values())
    dense_mm = by_op.get("aten.mm", 0)
    torch_total = total - by_op.get("aten.convolution_backward", 0) - dense_mm + side["torch"]
    return Counted(total, side["sparse"], torch_total, by_op)


def textbook_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(counted, textbook, modules): one forward of `model` on `x`, its conv + linear FLOPs as
    `counted_flops` gives them and as 2 N Cout (Cin / groups) kh kw Ho Wo (linear: 2 rows in out)
    over its Conv2d / Linear modules, and how many such modules ran."""
    book = [0, 0]

    def hook(mod: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            book[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            book[0] += 2 * (out.numel() // mod.out_features) * mod.in_features * mod.out_features
        book[1] += 1

    handles = [mod.register_forward_hook(hook) for mod in model.modules()
               if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            c = counted_flops(lambda: model(x))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return c.flops, book[0], book[1]


# --------------------------------------------------------------------------- formulas
def transition_nnz(h: int, w: int, radius: int) -> int:
    """Stored entries of the walk's transition matrix on an h x w grid
    (`random_walk.transition_matrix`): each cell's self-loop, and for every offset of
    `full_offsets(radius)` the cells whose neighbour lies inside the grid."""
    from wsss_core.affinity import full_offsets

    return h * w + sum(max(h - abs(dy), 0) * max(w - abs(dx), 0) for dy, dx in full_offsets(radius))


def walk_flops(n_pixels: int, nnz_per_row: float, n_channels: int, steps: int) -> float:
    """FLOPs of `random_walk`'s products: `steps` (2 ** exp_times) CSR (N x N) x dense (N x K)
    products, each a multiply and an add per stored entry and channel: 2 N nnz_per_row K steps.
    Not counted: building the matrix (affinities, ** beta, row sums: a few elementwise
    operations per entry, once) and the cams x (1 - boundary) start (N K)."""
    return 2.0 * n_pixels * nnz_per_row * n_channels * steps


def lattice_filter_flops(n_pixels: int, dims: int, lattice_points: int, values: int) -> int:
    """One Gaussian filter on pydensecrf's permutohedral lattice (`Permutohedral::compute`) of
    `values` channels with `dims` features: splat and slice a multiply-add per pixel, channel
    and each of the d + 1 simplex corners (2 x 2 (d + 1) N V), blur an add, a multiply and an
    add per lattice point, channel and each of the d + 1 axes (3 (d + 1) M V)."""
    return values * (4 * (dims + 1) * n_pixels + 3 * (dims + 1) * lattice_points)


def crf_flops(n_pixels: int, n_labels: int, iterations: int, kernels: Sequence[tuple[int, int]]) -> int:
    """FLOPs of one pydensecrf mean-field inference (`DenseCRF::inference`) over `n_labels` labels,
    `kernels` = (feature dims, lattice points) of each pairwise term (DenseCRF2D: Gaussian d = 2,
    bilateral d = 5), symmetric normalisation (pydensecrf's default), Potts compatibility.
    Set-up: per kernel its norm (a filter of ones, then 1 / sqrt: 2 N), and Q = softmax(-unary).
    Each iteration: -unary (N L); per kernel a filter of Q scaled by the norm before and after
    (2 N L), times the Potts weight and subtracted (2 N L); softmax (max, subtract, exp, sum,
    divide: 5 N L, exp counted as one). Not counted: building the lattices (elevating and
    ranking each pixel's features, hashing (d + 1) N keys and 2 (d + 1) M neighbours: integer
    work), and the SSE path's padding of L channels to a multiple of 4."""
    setup = sum(lattice_filter_flops(n_pixels, d, m, 1) + 2 * n_pixels for d, m in kernels)
    softmax = 5 * n_pixels * n_labels
    pairwise = sum(lattice_filter_flops(n_pixels, d, m, n_labels) + 4 * n_pixels * n_labels for d, m in kernels)
    return setup + softmax + iterations * (n_pixels * n_labels + pairwise + softmax)


def lattice_vertices(features: np.ndarray) -> int:
    """Lattice points pydensecrf's SSE `Permutohedral::init` creates for `features` (N, d): the
    distinct corners of the simplices enclosing the points, in its float32 arithmetic (elevate,
    round to the nearest 0-coloured point, rank, corners). The blur's work is 3 (d + 1) per point."""
    f = np.ascontiguousarray(features, np.float32)
    if f.ndim != 2 or f.shape[1] < 1 or f.shape[0] < 1:
        raise ValueError(f"features must be (N, d) with N, d >= 1, got shape {f.shape}")
    n, d = f.shape
    inv_std = np.float32(np.sqrt(2.0 / 3.0) * (d + 1))
    i = np.arange(d, dtype=np.float64)
    scale = (1.0 / np.sqrt((i + 2) * (i + 1)) * np.float64(inv_std)).astype(np.float32)
    elevated = np.empty((n, d + 1), np.float32)
    sm = np.zeros(n, np.float32)
    for j in range(d, 0, -1):
        cf = f[:, j - 1] * scale[j - 1]
        elevated[:, j] = sm - np.float32(j) * cf
        sm = sm + cf
    elevated[:, 0] = sm
    v = np.rint(elevated * np.float32(1.0 / (d + 1)))  # SSE rounding: to nearest, ties to even
    rem0 = (v * np.float32(d + 1)).astype(np.int64)
    diff = elevated - rem0.astype(np.float32)
    later = np.triu(np.ones((d + 1, d + 1), bool), 1)  # [i, j]: j > i
    # rank_i = #{j > i: diff_j > diff_i} + #{j < i: diff_j >= diff_i} (the pairwise loop's tie rule)
    rank = ((diff[:, None, :] > diff[:, :, None]) & later).sum(2) + \
        ((diff[:, None, :] >= diff[:, :, None]) & later.T).sum(2)
    rank += v.sum(1).astype(np.int64)[:, None]
    wrap = (d + 1) * ((rank < 0).astype(np.int64) - (rank > d))
    rank, rem0 = rank + wrap, rem0 + wrap
    r = np.arange(d + 1)
    canonical = np.where(r[None, :] <= d - r[:, None], r[:, None], r[:, None] - (d + 1))  # [remainder, rank]
    keys = rem0[:, None, :d] + canonical[:, rank[:, :d]].transpose(1, 0, 2)  # (N, d + 1 corners, d)
    return int(np.unique(keys.reshape(-1, d), axis=0).shape[0])


def crf_kernels(image: np.ndarray, crf: Any) -> list[tuple[int, int]]:
    """(feature dims, lattice points) of `crf.dense_crf`'s two kernels on `image` (H, W, 3):
    Gaussian (x / sxy, y / sxy) and bilateral (x / sxy, y / sxy, rgb / srgb), each padded
    with zero features to a multiple of 4 points as the SSE init does."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xy = [xs.ravel(), ys.ravel()]
    gauss = np.stack([c / np.float32(crf.gauss_sxy) for c in xy], 1)
    rgb = image.reshape(-1, 3).astype(np.float32) / np.float32(crf.bilateral_srgb)
    bilateral = np.concatenate([np.stack([c / np.float32(crf.bilateral_sxy) for c in xy], 1), rgb], 1)
    out = []
    for f in (gauss, bilateral):
        f = np.concatenate([f, np.zeros((-len(f) % 4, f.shape[1]), np.float32)])
        out.append((f.shape[1], lattice_vertices(f)))
    return out


def fraction_of_peak(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Achieved FLOP/s (flops / seconds) as a fraction of the peak FLOP/s."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"seconds and peak must be > 0, got {seconds} and {peak_flops_per_s}")
    return flops / seconds / peak_flops_per_s


# --------------------------------------------------------------------------- peak, loaders
def matmul_flops_per_s(dtype: torch.dtype, n: int, repeats: int, device: torch.device) -> float | None:
    """FLOP/s (2 n^3 per product) of an n x n matmul in `dtype`, best of `repeats`; None when
    this device cannot multiply in that dtype."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))

    def go() -> object:
        out = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    try:
        return 2 * n ** 3 / best_seconds(go, repeats)
    except RuntimeError:
        return None


def loader_rates(config: str, work: StageWork, stages: Sequence[str], items: int, repeats: int) -> dict[str, float]:
    """Training items per second of one process for each trained stage in `stages`, best of
    `repeats` after a warm-up (the real dataset of `config`; its masks stand in for the
    confident labels and pseudo masks)."""
    from wsss_core.affinity import AffinityTargets
    from wsss_core.config import load_config
    from wsss_core.data import open_dataset
    from wsss_core.data.transforms import JointTensors, LabelledTensors, joint_train_transform, train_transform
    from wsss_core.stages.segmentation import _MaskPairs

    cfg = load_config(config)
    ds = open_dataset(cfg.data, validate=False)
    split = cfg.data.train_split
    if not ds.has_masks(split):
        raise ValueError(f"{config}: the {split} split has no masks to stand in for the training labels")
    pairs = _MaskPairs(ds.masks(split), ds.ids(split))
    c, b, s = cfg.classifier, cfg.boundary, cfg.segmentation
    make = {
        "classifier": lambda: LabelledTensors(ds.labelled(split), train_transform(
            c.image_size, c.augment, *work.classifier.backbone.normalization)),
        "boundary": lambda: JointTensors(pairs, joint_train_transform(b.crop_size, b.augment,
                                                                      *work.boundary_net.normalization),
                                         target=AffinityTargets(b.radius)),
        "segmentation": lambda: JointTensors(pairs, joint_train_transform(s.crop_size, s.augment,
                                                                          *work.segmenter.normalization)),
    }
    rates = {}
    for name in (n for n in stages if n in TRAINED):
        data = make[name]()
        count = min(items, len(data))

        def go() -> int:
            for i in range(count):
                data[i]
            return count
        go()  # warm-up: the first items pay for cold files and the transforms' first calls
        rates[name] = best_rate(go, repeats)
    return rates


# --------------------------------------------------------------------------- output
def parse_stages(names: Sequence[str] | None) -> list[str]:
    """The stages to measure, in pipeline order (None: all); ValueError names an unknown one."""
    if not names:
        return list(STAGES)
    wanted = [n for part in names for n in part.split(",") if n]
    unknown = [n for n in wanted if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; known: {', '.join(STAGES)}")
    return [n for n in STAGES if n in wanted]


def si(x: float) -> str:
    """12.3 G, 456 M: three significant digits with a unit prefix."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """stage | FLOPs / image | s / image | GFLOP/s | fraction of peak | notes."""
    lines = ["| stage | FLOPs / image | s / image | GFLOP/s | fraction of peak | notes |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['stage']} | {si(r['flops_per_image'])} | {r['seconds_per_image']:.4f} | "
                     f"{r['gflops_per_s']:.2f} | {100 * r['fraction_of_peak']:.2f} % | {r['notes']} |")
    return "\n".join(lines)


def loader_note(loader: float | None, step: float) -> str:
    """Does one loader process keep up with the step (images per second each)?"""
    if loader is None:
        return "loader not measured"
    ratio = loader / step
    verdict = f"keeps up (in-process: +{100 / ratio:.0f} % on the step)" if ratio >= 1 else \
        f"too slow: needs >= {math.ceil(1 / ratio)} workers"
    return f"loader {loader:.1f} img/s vs step {step:.1f} img/s (x{ratio:.1f}): {verdict}"


def measure(work: StageWork, name: str, repeats: int) -> dict[str, Any]:
    """Seconds and FLOPs per image of one stage, with what the FLOPs cover."""
    fn, per_call = work.work(name)
    seconds = best_seconds(fn, repeats) / per_call
    cfg, notes = work.cfg, []
    if name == "crf":
        kernels = crf_kernels(work.image, cfg.crf)
        crfs = 1 if cfg.crf.conf_bg_thres == cfg.crf.conf_fg_thres else 2
        flops = crfs * crf_flops(work.image.shape[0] * work.image.shape[1], len(work.keys) + 1, cfg.crf.iterations,
                                 kernels)
        notes.append(f"formula: {crfs} CRFs x {cfg.crf.iterations} iterations, {len(work.keys) + 1} labels, lattice "
                     f"points {kernels[0][1]:,} (d 2) / {kernels[1][1]:,} (d 5); pydensecrf: 1 thread, lattice "
                     "hashing not counted")
        return {"flops_per_image": float(flops), "seconds_per_image": seconds, "notes": "; ".join(notes),
                "lattice_points": [m for _, m in kernels]}
    c = counted_flops(fn)
    flops = c.flops / per_call
    extra: dict[str, Any] = {"counted_by_op": {k: v / per_call for k, v in c.by_op.items()},
                             "counted_sparse_flops": c.sparse_flops / per_call,
                             "torch_own_count_flops": c.torch_flops / per_call}
    if name == "pseudo_masks":
        p = cfg.pseudo_masks
        h4, w4 = work.cams.cam.shape[1:]
        nnz = transition_nnz(h4, w4, p.radius)
        k = len(work.keys) + (p.bg_power is not None)
        walked = walk_flops(h4 * w4, nnz / (h4 * w4), k, 2 ** p.exp_times)
        same = "= counter's sparse mm" if math.isclose(walked, c.sparse_flops) else \
            f"counter's sparse mm {si(c.sparse_flops)}"
        notes.append(f"no refinement CRF; boundary map {si(flops)} (counter) + walk {si(walked)} (formula: "
                     f"{h4}x{w4} cells, {nnz / (h4 * w4):.1f} nnz/row, K {k}, {2 ** p.exp_times} products; {same})")
        flops += walked
        extra["walk_flops"] = walked
    if c.torch_flops != c.flops + c.sparse_flops:
        notes.append(f"torch's own count x{c.torch_flops / (c.flops + c.sparse_flops):.2f}")
    if name in TRAINED:
        notes.insert(0, f"fwd+bwd+SGD, batch {per_call}")
    elif name == "predict":
        notes.insert(0, f"TTA scales {list(cfg.predict.tta_scales)}{' + flip' if cfg.predict.tta_flip else ''}, "
                        "no refinement CRF")  # as stage_costs: predict.crf_gt_prob's CRF left out
    elif name == "cams":
        notes.insert(0, f"{cfg.cams.method}, scales {list(cfg.cams.scales)}{' + flip' if cfg.cams.flip else ''}")
    return {"flops_per_image": float(flops), "seconds_per_image": seconds, "notes": "; ".join(notes), **extra}


MODELS = {"classifier": ("classifier", "cams"), "boundary_net": ("boundary", "pseudo_masks"),
          "segmenter": ("segmentation", "predict")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, default_config="params/msrc.yaml")
    ap.add_argument("--stages", nargs="+", default=None, help=f"a subset of {', '.join(STAGES)} (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--peak-size", type=int, default=2048, help="n of the n x n peak matmul")
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--items", type=int, default=32, help="loader items per measurement")
    args = ap.parse_args()
    try:
        stages = parse_stages(args.stages)
        for opt in ("repeats", "batch", "peak_size", "peak_repeats", "items", "classes"):
            if getattr(args, opt) < 1:
                raise ValueError(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
        if min(args.size) < 16:
            raise ValueError(f"--size must be at least 16 x 16 pixels, got {args.size[0]} x {args.size[1]}")
    except ValueError as e:
        sys.exit(f"pipeline_speed: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from wsss_core import runtime
    from wsss_core.config import load_config

    try:
        device = runtime.resolve_device(args.device)
    except ValueError as e:  # ConfigError: cuda asked for, none present
        sys.exit(f"pipeline_speed: {e}")
    cfg = load_config(args.config, {"data.root": "."})  # the stages' work reads no data
    h, w = args.size
    work = StageWork(cfg, load_photo(args.image, (h, w)), args.classes, args.num_classes, args.batch, device)
    peak = {str(dt).removeprefix("torch."): matmul_flops_per_s(dt, args.peak_size, args.peak_repeats, device)
            for dt in (torch.float32, torch.bfloat16)}
    if not peak["float32"]:
        sys.exit("pipeline_speed: the float32 peak matmul failed on this device")
    rows = {}
    for name in stages:
        rows[name] = {"stage": name, **measure(work, name, args.repeats)}
        rows[name]["gflops_per_s"] = rows[name]["flops_per_image"] / rows[name]["seconds_per_image"] / 1e9
        rows[name]["fraction_of_peak"] = fraction_of_peak(rows[name]["flops_per_image"],
                                                          rows[name]["seconds_per_image"], peak["float32"])
    coverage = {}
    for attr, users in MODELS.items():
        if any(u in stages for u in users):
            counted, book, modules = textbook_flops(getattr(work, attr), torch.randn(1, 3, 64, 64, device=device))
            coverage[attr] = {"counted": counted, "textbook": book, "modules": modules}
    loaders: dict[str, float] = {}
    loader_error = None
    if any(n in TRAINED for n in stages):
        try:
            loaders = loader_rates(args.config, work, stages, args.items, args.repeats)
        except (ValueError, OSError) as e:
            loader_error = f"loaders not measured: {e}"
    for name in (n for n in stages if n in TRAINED):
        rows[name]["loader_images_per_s"] = loaders.get(name)
        rows[name]["step_images_per_s"] = 1 / rows[name]["seconds_per_image"]
        rows[name]["notes"] += "; " + loader_note(loaders.get(name), rows[name]["step_images_per_s"])

    threads = torch.get_num_threads()
    print(f"{args.config}: {h}x{w} photo, {args.classes} classes, threads: {threads}, {device}, "
          f"best of {args.repeats}")
    print()
    print(markdown_table(list(rows.values())))
    print()
    f32, bf16 = peak["float32"], peak["bfloat16"]
    print(f"peak: float32 matmul {args.peak_size}x{args.peak_size} {f32 / 1e9:.1f} GFLOP/s "
          f"(threads: {threads}, best of {args.peak_repeats}); fraction of peak is against this")
    faster = None if bf16 is None else bf16 > f32
    print("peak: bfloat16 matmul " + ("not run on this device" if bf16 is None else
          f"{bf16 / 1e9:.1f} GFLOP/s, x{bf16 / f32:.2f} float32: bfloat16 is {'' if faster else 'not '}faster"))
    for attr, cv in coverage.items():
        seen = "sees all of them" if cv["counted"] == cv["textbook"] else "DIFFERS"
        print(f"counter check, {attr}: {cv['modules']} Conv2d/Linear modules in one 64x64 forward, counted "
              f"{si(cv['counted'])} vs textbook {si(cv['textbook'])}: {seen}")
    print("counted: convolutions and matrix products (torch FlopCounterMode, depthwise conv backward and sparse mm "
          "recounted); not counted: batch norm, activations, pooling, interpolation, softmax, losses, optimizer")
    print("torch's own count: FlopCounterMode's formulas as they are (a grouped conv's weight gradient and a sparse "
          "mm counted as dense)")
    if loader_error:
        print(loader_error)
    if args.json:
        out = {"config": args.config, "size": [h, w], "classes": args.classes, "threads": threads,
               "device": str(device), "peak_flops_per_s": peak, "peak_size": args.peak_size,
               "bfloat16_faster": faster, "counter_check": coverage,
               "loader_error": loader_error, "stages": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
