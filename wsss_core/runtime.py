"""Run-time state in one place: device, seeds, torchrun processes, progress bars.

Under `torchrun --nproc_per_node N`, every process runs the same stage:
training stages use DistributedDataParallel, per-image stages take every N-th
image (`shard`). Only this module reads the torchrun environment
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or joins the process group.

torch is imported where it is used: the data stage and a rerun that skips
every stage start without its second of import time.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, TypeVar

import numpy as np

from .config import ConfigError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA if available else CPU; under torchrun, this rank's GPU."""
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available (use auto or cpu)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def check_device(name: str) -> None:
    """Fail before any work when `device: cuda` names a device this machine lacks
    (auto and cpu always work; torch is imported only for cuda)."""
    if name == "cuda":
        resolve_device(name)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def rank() -> int:
    """This process's rank (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes torchrun launched (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0: the process that writes shared files (manifests, models, metrics)."""
    return rank() == 0


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (else single
    process). gloo on CPU, nccl on CUDA. Safe to call more than once."""
    if world_size() <= 1:
        return DistInfo()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)  # collectives (all_reduce, all_gather_object) use this rank's GPU
        dist.init_process_group(backend="nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    return DistInfo(dist.get_rank(), dist.get_world_size())


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_distributed(wait: bool = True) -> None:
    """Leave the process group, if this process joined one. Call before the
    process exits: an undestroyed gloo group can abort the interpreter's
    shutdown ("terminate called without an active exception", SIGABRT).
    `wait` first waits for every process, so none leaves while another still
    uses the group; a failing process does not wait (torchrun stops the rest)."""
    if "torch.distributed" not in sys.modules:  # never imported: never joined
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every world_size-th item from its rank."""
    n = world_size()
    return list(items)[rank()::n] if n > 1 else list(items)


def progress(iterable: Iterable, total: int | None = None, desc: str = "", disable: bool | None = None):
    """A progress bar, shown on rank 0 only.

    - batch run (WSSS_BATCH set: `wsss run` off a terminal (a log file, a sweep
      worker), or a notebook it executes, where every refresh stays as a line): text on
      stdout, a refresh only when both a quarter of the total and 60 s have
      passed since the last one, so a loop leaves its first line, at most 3
      more and the final one (only the first and the final under a minute);
    - interactive Jupyter kernel: one updating widget (tqdm.notebook) when
      ipywidgets is installed, else the terminal's text bar;
    - terminal: a text bar on stdout refreshed every 0.5 s.
    """
    from tqdm import tqdm

    if disable is None:
        disable = not is_main()
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except (TypeError, AttributeError):  # as tqdm itself: no length, no total
            total = None
    batch = bool(os.environ.get("WSSS_BATCH"))  # set by the pipeline runner
    if not batch and _in_jupyter_kernel():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm(iterable, total=total, desc=desc, disable=disable)
        except ImportError:
            pass
    text = dict(total=total, desc=desc, file=sys.stdout, ncols=100, ascii=True, disable=disable)
    if batch:
        # tqdm refreshes when n - last >= miniters AND dt >= mininterval: the rarer of the two rules.
        # total // 4 + 1 leaves at most 3 refreshes before the end; maxinterval inf stops tqdm's
        # monitor thread from lowering miniters to 1 on a slow loop.
        quarter = total // 4 + 1 if total else None
        return tqdm(iterable, mininterval=60.0, miniters=quarter, maxinterval=float("inf"), **text)
    return tqdm(iterable, mininterval=0.5, **text)


def _in_jupyter_kernel() -> bool:
    """True inside a running IPython kernel (JupyterLab, VS Code, papermill), not in plain IPython."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def loader_workers(requested: int | None, device: torch.device) -> int:
    """Data-loader worker processes. On a CPU the training's own threads use
    every core and worker processes only compete with them (decoding and
    augmenting is a small share of a step), so the default there is none."""
    if requested is not None:
        return requested
    return 4 if device.type == "cuda" else 0


def sum_over_ranks(value: float) -> float:
    """Sum of `value` over every process (the value itself in a single process)."""
    if world_size() <= 1:
        return value
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def machine() -> dict[str, Any]:
    """CPU, GPU, torch version: what the numbers were measured on."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
