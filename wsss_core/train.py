"""The one fit loop, shared by the classifier, the label filter, IRNet and the
segmenter.

CUDA when present, mixed precision on CUDA, deterministic seeds, a checkpoint
every epoch with exact resume (holding the history), text progress bars that read
well in JupyterLab and in papermill logs, and a clear error on a NaN loss.
Under torchrun it trains with DistributedDataParallel (gloo on CPU, nccl on
CUDA); only rank 0 writes files.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data.sampling import EpochSampler
from .runtime import DistInfo, init_distributed, progress, seed_everything
from .store import FileError, read_torch, save_torch

LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, Any]]


# --------------------------------------------------------------------------- schedule
def lr_lambda(schedule: str, total_steps: int, steps_per_epoch: int, step_size: int = 3, gamma: float = 0.2,
              power: float = 0.9) -> Callable[[int], float]:
    """Multiplier of the base lr at optimiser step t (step: per epoch; poly: per step)."""
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "step":
        return lambda t: gamma ** ((t // max(steps_per_epoch, 1)) // step_size)
    if schedule == "poly":
        return lambda t: max(0.0, 1.0 - t / max(total_steps, 1)) ** power
    raise ValueError(f"unknown schedule {schedule!r} (step | poly | constant)")


def build_optimizer(groups: list[dict], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), Adam (L2 penalty in the gradient) or AdamW (decoupled weight decay)."""
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (adam | adamw | sgd)")


# --------------------------------------------------------------------------- fit
@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    seed: int = 0
    num_workers: int = 0
    amp: bool = True
    schedule: str = "constant"
    step_size: int = 3
    gamma: float = 0.2
    desc: str = "train"
    stop_after_epochs: int | None = None  # for tests: simulate an interruption
    drop_single_last: bool = False  # drop a last batch of one image (BatchNorm on 1x1 maps needs 2)
    channels_last: bool = True  # NHWC convolutions: 1.4-1.5x faster training on CPU (oneDNN), same maths
    eval_every: int = 1  # eval_fn after every N-th epoch and after the last (evaluation only: no weight changes)


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    samples_per_rank: list[list[int]] | None = None
    param_checksums: list[float] | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def param_checksum(model: nn.Module) -> float:
    """Sum of all parameters in float64: equal models give equal numbers."""
    return float(sum(p.detach().double().sum().item() for p in _unwrap(model).parameters()))


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (the checkpoint loads with
    `weights_only=True`, so it can hold nothing else)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    n, p = state["numpy"], state["python"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    loss_fn: LossFn,
    param_groups: list[dict],
    optimizer: str,
    lr: float,
    weight_decay: float,
    cfg: FitConfig,
    out_dir: str | Path,
    device: torch.device,
    sample_weights: np.ndarray | None = None,
    eval_fn: EvalFn | None = None,
    collate_fn: Callable | None = None,
) -> FitResult:
    """Train `model` for cfg.epochs, resuming from `out_dir/checkpoint.pt` if present.

    `loss_fn(model, batch)` returns the scalar loss of a batch (batch = what
    the loader yields, moved to `device`). Writes `checkpoint.pt` (the
    weights, optimizer, schedule, RNG state and the history so far) after
    every epoch, on rank 0; the stage stores the history (`trained.fit_or_load`).
    """
    out_dir = Path(out_dir)
    info = init_distributed(device)
    seed_everything(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(param_groups, optimizer, lr, weight_decay)
    sampler = EpochSampler(len(dataset), sample_weights, cfg.seed, info.rank, info.world_size)
    drop_last = cfg.drop_single_last and len(sampler) > 1 and len(sampler) % cfg.batch_size == 1
    steps_per_epoch = max(1, len(sampler) // cfg.batch_size if drop_last else math.ceil(len(sampler) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.schedule, steps_per_epoch * cfg.epochs, steps_per_epoch, cfg.step_size, cfg.gamma)
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    result = FitResult()
    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch = 0
    if ckpt_path.is_file():
        ckpt = read_torch(ckpt_path, "training checkpoint")
        try:
            _unwrap(model).load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileError(f"{ckpt_path}: does not fit this training ({detail}); delete it to start over "
                            "(or rerun with --force)") from None
        result.history = ckpt["history"]
        start_epoch = result.resumed_from = ckpt["epoch"]
        if info.is_main:
            print(f"[wsss] resuming {cfg.desc} from epoch {start_epoch} ({ckpt_path})")

    train_model: nn.Module = model
    if info.active:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        persistent_workers=False,  # workers get the dataset's epoch (set_epoch) when each epoch starts
        drop_last=drop_last,
        worker_init_fn=_one_thread_worker,
    )
    seen: list[int] = []
    last_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, cfg.stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        train_model.train()
        t0 = time.perf_counter()
        total, count = 0.0, 0
        bar = progress(loader, total=len(loader), desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}", disable=not info.is_main)
        for step, batch in enumerate(bar):
            batch = to_device(batch, device, cfg.channels_last)
            if isinstance(batch, (list, tuple)) and len(batch) >= 3:  # datasets put the sample index last
                seen.extend(int(i) for i in batch[-1])
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(train_model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{cfg.desc}: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {sched.get_last_lr()[-1]:.3g}); lower the learning rate or check the inputs"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            n = _batch_len(batch)
            total += float(loss.detach()) * n
            count += n
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": _mean_across_ranks(total, count, info, device),
            "lr": [g["lr"] for g in opt.param_groups],
            "seconds": round(seconds, 2),
            "images_per_s": round(count * info.world_size / max(seconds, 1e-9), 2),
        }
        if eval_fn is not None and info.is_main and evaluated(epoch + 1, cfg.epochs, cfg.eval_every):
            model.eval()
            record.update(eval_fn(_unwrap(model)))
        result.history.append(record)
        if info.is_main:
            print(f"[wsss] {cfg.desc} epoch {epoch + 1}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "seconds"))
            save_torch(ckpt_path, {
                "epoch": epoch + 1,
                "model": _unwrap(model).state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "history": result.history,
            })
        if info.active:
            dist.barrier()

    if info.active:
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, {"seen": seen, "checksum": param_checksum(model)})
        result.samples_per_rank = [g["seen"] for g in gathered]
        result.param_checksums = [g["checksum"] for g in gathered]
    else:
        result.samples_per_rank = [seen]
        result.param_checksums = [param_checksum(model)]
    return result


def evaluated(epoch: int, epochs: int, every: int) -> bool:
    """Whether `fit` evaluates after (1-based) `epoch` of `epochs`: every `every`-th epoch and the last."""
    return epoch % every == 0 or epoch == epochs


def _one_thread_worker(_: int) -> None:
    """Loader workers decode and augment; one thread each, or OpenMP threads of
    the workers and the training process oversubscribe the cores (10x slower)."""
    torch.set_num_threads(1)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():  # image batches
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0])


def _mean_across_ranks(total: float, count: int, info: DistInfo, device: torch.device) -> float:
    if not info.active:
        return total / max(count, 1)
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def predict(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
    desc: str = "predict",
) -> np.ndarray:
    """Sigmoid scores of `model` on every item of `dataset`, in order."""
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    with torch.inference_mode():
        for batch in progress(loader, total=len(loader), desc=desc):
            x = batch[0].to(device)
            out.append(torch.sigmoid(model(x).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


__all__: Sequence[str] = ["FitConfig", "FitResult", "fit", "predict", "lr_lambda", "param_checksum"]
