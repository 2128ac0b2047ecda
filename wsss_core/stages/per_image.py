"""The one per-image loop, shared by every stage that writes a file per image
(CAMs, confident labels, pseudo masks, predictions).

Under torchrun each process takes every N-th image (`runtime.shard`); images
whose file exists are skipped (resume after an interruption: only missing
files are computed); each result is written atomically as soon as it is
made; all processes meet at a barrier; then rank 0 checks that every image
has its file and evaluates. Throughput is accumulated over resumed attempts
in `throughput.json`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .. import runtime
from ..artifacts import PerImage, add_throughput
from ..store import Run

if TYPE_CHECKING:
    import torch

ComputeMany = Callable[[list[str]], Iterable[tuple[str, Any]]]


def for_each_image(
    run: Run,
    artifact: PerImage,
    ids: Sequence[str],
    compute_many: ComputeMany,
    desc: str,
    device: torch.device | None = None,
    evaluate: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write `artifact` for every id in `ids`; returns the stage's metrics.

    `compute_many(todo_ids)` yields (id, value) pairs in any order (a stage may
    batch or run a worker pool); each value is written with `artifact.write`.
    `evaluate()` runs on rank 0 once all files exist; its dict joins the metrics.
    """
    runtime.init_distributed(device)
    artifact.dir(run).mkdir(parents=True, exist_ok=True)
    todo = [i for i in runtime.shard(ids) if not artifact.exists(run, i)]
    t0 = time.perf_counter()
    done = 0
    for image_id, value in runtime.progress(compute_many(todo), total=len(todo), desc=desc):
        artifact.write(run, image_id, value)
        done += 1
    seconds = time.perf_counter() - t0
    runtime.barrier()
    computed = int(runtime.sum_over_ranks(done))
    metrics: dict[str, Any] = {"images": len(ids), "computed": computed}
    if not run.is_main:
        return metrics
    missing = [i for i in ids if not artifact.exists(run, i)]
    if missing:
        raise RuntimeError(f"{artifact.dir(run)}: {len(missing)} of {len(ids)} images have no output after "
                           f"every process finished, e.g. {missing[0]!r}")
    metrics["images_per_s"] = add_throughput(run, artifact.stage, artifact.subdir, computed, seconds)
    if evaluate is not None:
        metrics.update(evaluate())
    return metrics
