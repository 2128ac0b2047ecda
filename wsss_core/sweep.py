"""`wsss sweep`: a grid of variants of one experiment, each a normal run, that
share every stage the grid does not change.

`--grid pseudo_masks.beta=3,5,10 --grid pseudo_masks.exp_times=4,8` makes one
run folder per combination (`<sweep>/beta=3,exp_times=4/`, ...). A stage is
computed once per distinct fingerprint across the sweep: before a variant
runs, every stage whose fingerprint an earlier variant (or `--reuse RUN`)
has finished is hard-linked into it, file by file, with its executed
notebook; the variant then runs the rest with `run_pipeline` (what `wsss run`
does) in a worker process, which sends its StageEvents back as values. Sharing is safe
because no file of a run is ever edited in place: every write creates a new
file and renames it over the old name, so a variant that redoes a shared
stage replaces its own links and leaves the others' files as they were.

`--seeds segmentation=3` runs every variant with 3 seeds of the named
stages (`--seeds boundary,segmentation=3`; `--seeds all=3`: every stage): the
first replicate is the variant itself (its stage seeds as the parameter file
has them), replicate k sets each named stage's seed to its own plus k
(`beta=3,segmentation.seed=1/`, ...; with `all`, the top-level `seed` and
every stage seed the file sets), so replicates share every stage upstream of
the reseeded ones, and `wsss compare` pools them into one row.

One lock per sweep; a killed sweep resumes (finished variants are skipped,
finished stages kept). `--jobs N` runs variants whose shared stages are
ready in N processes (each on its own GPU when there are several).
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .config import (ConfigError, config_class, dump_config, flow_yaml, kind_of, load_config, parse_override_value,
                     seed_keys)
from .stages import STAGES, open_run, pipeline_order
from .store import FileError, FolderLock, Run, describe_os_error, file_errors, read_json, write_json, write_text

SWEEP_FILE = "sweep.json"
BASE_CONFIG = "base-config.yaml"  # the parameter file as the sweep started (not "config.yaml": not a run)
VARIANT_LOG = "sweep.log"  # a variant's whole output (its tracebacks too), in its folder


@dataclass(frozen=True)
class Variant:
    """One combination of the grid: its folder name and its overrides."""

    name: str
    values: dict[str, Any]  # dotted key -> value of the grid
    overrides: dict[str, Any]  # the user's --set plus `values`


def split_values(text: str) -> list[str]:
    """`3,5,10` -> ['3', '5', '10']; commas inside brackets or quotes do not split
    (`[1.0],[1.0,1.5]` -> ['[1.0]', '[1.0,1.5]'])."""
    parts, depth, quote, current = [], 0, "", ""
    for c in text:
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += c
    parts.append(current)
    return [p.strip() for p in parts]


def parse_grid(items: Sequence[str], seeds: str | None = None) -> dict[str, list[Any]]:
    """`--grid KEY=V1,V2` items -> {key: [values]} (each value read as YAML); none is fine with `--seeds`."""
    if not items and seeds is None:
        raise ConfigError("--grid: none given; e.g. --grid pseudo_masks.beta=3,5,10 (or --seeds segmentation=3)")
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. pseudo_masks.beta=3,5,10")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        texts = split_values(text)
        if not text.strip() or any(not t for t in texts):
            raise ConfigError(f"--grid {key}={text}: empty value")
        values = [parse_override_value(t, key, "--grid") for t in texts]
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"--grid {key}={text}: a value is repeated")
        grid[key] = values
    return grid


MAX_SEEDS = 100


def parse_seeds(text: str | None) -> tuple[list[str], int] | None:
    """`--seeds segmentation=3` / `boundary,segmentation=3` / `all=3` -> (seed keys to move, replicates);
    the keys are the stages' `<section>.seed`, or `all`'s (resolved per variant: `replicate_values`)."""
    if text is None:
        return None
    names, sep, count = text.partition("=")
    stages = [n.strip() for n in names.split(",")]
    if not sep or not all(stages) or not count.strip():
        raise ConfigError(f"--seeds {text!r}: expected STAGE[,STAGE]=N or all=N, e.g. --seeds segmentation=3")
    try:
        n = int(count)
    except ValueError:
        raise ConfigError(f"--seeds {text}: {count.strip()!r} is not a whole number of seeds") from None
    if not 2 <= n <= MAX_SEEDS:
        raise ConfigError(f"--seeds {text}: the number of seeds must be in [2, {MAX_SEEDS}], got {n}")
    if stages == ["all"]:
        return ["all"], n
    known = {k.split(".")[0]: k for k in seed_keys(config_class()) if "." in k}
    for st in stages:
        if st not in known:
            hint = " (the bound trains with segmentation.seed)" if st == "bound" else ""
            raise ConfigError(f"--seeds {text}: {st!r} draws no random numbers of its own{hint}; stages with a seed: "
                              f"{', '.join(known)} (or all)")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"--seeds {text}: a stage is named twice")
    return [known[st] for st in stages], n


def replicate_values(cfg: Any, keys: Sequence[str], k: int) -> dict[str, int]:
    """The seed overrides of replicate k (0: none, the variant itself): each key's seed as `cfg` has it,
    plus k. A stage seed left unset counts from the top-level seed; `all`: the top-level seed and every
    stage seed the config sets."""
    if k == 0:
        return {}
    if list(keys) == ["all"]:
        keys = ["seed"] + [key for key in seed_keys(type(cfg)) if "." in key
                           and getattr(getattr(cfg, key.split(".")[0]), "seed") is not None]
    return {key: (cfg.seed if key == "seed" else cfg.seed_of(key.split(".")[0])) + k for key in keys}


def variants(config: str | Path, grid: Mapping[str, list[Any]], overrides: Mapping[str, Any],
             seeds: tuple[list[str], int] | None = None) -> list[Variant]:
    """Every combination (times its seed replicates, `parse_seeds`), checked (each loads as a config)
    before any work."""
    def check(values: Mapping[str, Any]) -> None:
        try:
            load_config(config, {**overrides, **values})  # unknown key, wrong type: one line naming it
        except ConfigError as e:
            text = str(e)
            key = next((k for k in values if text.startswith(f"--set {k}=")), None)
            raise ConfigError(f"--grid {text[len('--set '):]}" if key else text, e.key) from None

    for key in grid:
        check({key: grid[key][0]})
        if kind_of(config_class(), key) == "runtime":
            raise ConfigError(f"--grid {key}: a runtime-only field (it changes no output: workers, device, ...); "
                              "a sweep over it would make identical variants")
    if seeds is not None:
        moved = set(seed_keys(config_class())) if seeds[0] == ["all"] else set(seeds[0])
        clash = [k for k in grid if k in moved]
        if clash:
            raise ConfigError(f"--seeds: --grid {clash[0]} sweeps a seed the replicates move; give one of the two")
    leaves = [k.rsplit(".", 1)[-1] for k in grid]
    labels = {k: (k.rsplit(".", 1)[-1] if leaves.count(k.rsplit(".", 1)[-1]) == 1 else k) for k in grid}
    out = []
    combos = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = ",".join(f"{labels[k]}={flow_yaml(v).replace(' ', '')}" for k, v in values.items())
        if seeds is None:
            combos.append((name, values))
            continue
        check(values)
        cfg = load_config(config, {**overrides, **values})
        for k in range(seeds[1]):
            extra = replicate_values(cfg, seeds[0], k)
            combos.append((",".join(filter(None, [name] + [f"{key}={v}" for key, v in extra.items()])) or "base",
                           {**values, **extra}))
    for name, values in combos:
        if "/" in name or name.startswith(".") or any(c.isspace() or ord(c) < 32 for c in name):
            raise ConfigError(f"--grid: the variant name {name!r} cannot be a folder name")
        if len(name.encode()) > 200:  # file systems allow 255 bytes per name, and the stage files add theirs
            raise ConfigError(f"--grid: the variant name {name[:60]}... is {len(name.encode())} bytes, too long "
                              "for a folder name (at most 200); sweep fewer or shorter values per key")
        check(values)
        out.append(Variant(name, values, {**overrides, **values}))
    return out


# --------------------------------------------------------------------------- sharing stages
def link_stage(src: Run, dst: Run, name: str) -> None:
    """Hard-link a finished stage's folder (and its executed notebook) from `src` into `dst`."""
    from_folder, to_folder = src.folder(name), dst.inside(dst.folder(name))
    staging = to_folder.with_name(f".{to_folder.name}.linking")  # complete, then renamed into place:
    with file_errors(to_folder, "linking"):                        # a kill never leaves half a stage
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for p in sorted(from_folder.rglob("*")):
            target = staging / p.relative_to(from_folder)
            if p.is_dir():
                target.mkdir(exist_ok=True)
            elif not p.name.startswith(".wsss"):
                os.link(p, target)
        if to_folder.exists():
            shutil.rmtree(to_folder)
        os.rename(staging, to_folder)
    nb = STAGES[name].notebook
    if nb:
        sharing = [s for s in STAGES if STAGES[s].notebook == nb]
        executed = src.root / "notebooks" / Path(nb).name
        if executed.is_file() and all(dst.usable(s) or s == name for s in sharing):
            (dst.root / "notebooks").mkdir(exist_ok=True)
            target = dst.inside(dst.root / "notebooks" / executed.name)
            with file_errors(target, "linking"):
                target.unlink(missing_ok=True)
                os.link(executed, target)


def share_finished_stages(run: Run, sources: Sequence[Run], to_stage: str | None,
                          say: Callable[[str], None]) -> list[str]:
    """Link into `run`, in pipeline order, each stage that a source has finished
    with the same fingerprint (and is not usable in `run` yet); returns their names.
    Holds the run's lock (a variant is a normal run a user may also be running)."""
    import errno

    linked = []
    with run.lock("wsss sweep (sharing stages)"):
        for name in _stages(to_stage):
            if run.usable(name):
                continue
            source = next((s for s in sources if s.usable(name) and s.fingerprint(name) == run.fingerprint(name)
                           and s.root != run.root), None)
            if source is None:
                continue  # computed by the variant itself (and so is what depends on it: other fingerprints)
            try:
                link_stage(source, run, name)
            except FileError as e:
                if isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.EXDEV:
                    say(f"{name} not shared: {source.root} is on another file system; computed here")
                    continue
                raise
            linked.append(name)
            say(f"{name} shared with {source.root.name} (same parameters)")
        if linked:
            run.save_config()  # a variant made only of shared stages is still a run folder
    return linked


# --------------------------------------------------------------------------- the sweep
def run_sweep(config: str | Path, sweep_dir: str | Path, grid_items: Sequence[str],
              overrides: Mapping[str, Any] | None = None, to_stage: str | None = None, jobs: int = 1,
              reuse: Sequence[str | Path] = (), echo: Callable[[str], None] | None = None,
              seeds: str | None = None, draw: bool = True) -> Path:
    """Run every variant of the grid (each with its seed replicates: `seeds`, as `--seeds`) in `sweep_dir`;
    returns it. `draw=False`: the variants execute no notebook."""
    echo = echo or (lambda s: print(s, flush=True))
    overrides = dict(overrides or {})
    config = Path(config).resolve()
    load_config(config, overrides)
    if to_stage is not None and to_stage not in STAGES:
        raise ConfigError(f"--to {to_stage}: unknown stage; stages: {', '.join(STAGES)}")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1")
    grid = parse_grid(grid_items, seeds)
    todo = variants(config, grid, overrides, parse_seeds(seeds))
    jobs = min(jobs, len(todo))  # more processes than variants would only wait
    sweep_dir = Path(sweep_dir).resolve()
    reused = [_reused_run(Path(r)) for r in reuse]
    from .store import check_writable_folder

    check_writable_folder(sweep_dir, "the sweep folder")
    if sweep_dir.is_dir() and any(sweep_dir.iterdir()) and not (sweep_dir / SWEEP_FILE).is_file():
        raise FileError(f"{sweep_dir}: not empty and not a sweep folder (no {SWEEP_FILE}); choose another")
    with FolderLock(sweep_dir).hold("wsss sweep"):
        record = {"config": str(config), "overrides": overrides, "grid": grid, "to": to_stage,
                  **({"seeds": seeds} if seeds is not None else {}), "variants": [{"name": v.name, "values": v.values} for v in todo]}
        old = read_json(sweep_dir / SWEEP_FILE) if (sweep_dir / SWEEP_FILE).is_file() else None
        if old is not None and ({k: old.get(k) for k in record} != record or old.get("seeds") != seeds):
            raise ConfigError(f"{sweep_dir}: holds another sweep ({SWEEP_FILE} differs: config, --set, --grid, "
                              "--seeds or --to); choose another folder")
        write_json(sweep_dir / SWEEP_FILE, record)
        # every variant starts from this copy of the file as the sweep first started (a resumed sweep keeps
        # it): a parameter file edited while the sweep goes on does not reach the variants still to come
        base = sweep_dir / BASE_CONFIG
        if not base.is_file():
            write_text(base, dump_config(load_config(config)))
        runs = [open_run(sweep_dir / v.name, load_config(base, v.overrides)) for v in todo]
        owners = _owners(runs, to_stage, reused)
        _schedule(todo, runs, owners, reused, base, to_stage, jobs, echo, draw)
    echo(f"[wsss] sweep finished: {len(todo)} variants in {sweep_dir} (wsss compare {sweep_dir})")
    return sweep_dir


def _reused_run(root: Path) -> Run:
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"--reuse {root}: not a run folder (no config.yaml)")
    run = open_run(root, load_config(root / "config.yaml"))
    run.refuse_archive("--reuse")
    return run


def _stages(to_stage: str | None) -> list[str]:
    order = pipeline_order()
    return order[: order.index(to_stage) + 1] if to_stage else order


def _owners(runs: Sequence[Run], to_stage: str | None, reused: Sequence[Run]) -> list[set[int]]:
    """For each variant, the earlier variants whose stages it will share (they must finish first)."""
    first: dict[tuple[str, str], int] = {}
    deps: list[set[int]] = []
    for i, run in enumerate(runs):
        need: set[int] = set()
        for name in _stages(to_stage):
            fp = run.fingerprint(name)
            if any(r.usable(name) and r.fingerprint(name) == fp for r in reused):
                continue
            owner = first.setdefault((name, fp), i)
            if owner != i:
                need.add(owner)
        deps.append(need)
    return deps


def _schedule(todo: Sequence[Variant], runs: Sequence[Run], deps: Sequence[set[int]], reused: Sequence[Run],
              config: Path, to_stage: str | None, jobs: int, echo: Callable[[str], None], draw: bool = True) -> None:
    """Run the variants, each once the variants it shares stages with are done, `jobs` at a time, each in a
    worker process whose events come back as values on its queue."""
    n = len(todo)
    done: set[int] = set()
    running: dict[int, _Worker] = {}
    failed: list[str] = []
    gpus = _gpu_count()
    free_slots = list(range(jobs))
    slot_of: dict[int, int] = {}
    try:
        while len(done) + len(failed) < n:
            ready = [i for i in range(n) if i not in done and i not in running and todo[i].name not in failed
                     and deps[i] <= done]
            while ready and free_slots:
                i = ready.pop(0)
                tag = f"[{i + 1}/{n} {todo[i].name}]"
                share_finished_stages(runs[i], [*reused, *(runs[j] for j in sorted(done))], to_stage,
                                      lambda s, tag=tag: echo(f"{tag} {s}"))
                slot = free_slots.pop(0)
                slot_of[i] = slot
                running[i] = _Worker(todo[i], runs[i], config, to_stage, tag, slot % gpus if gpus > 1 else None,
                                     draw)
            if not running:
                blocked = [todo[i].name for i in range(n) if i not in done and todo[i].name not in failed]
                raise FileError(f"sweep: variants {', '.join(blocked)} wait for variants that failed")
            for i, worker in list(running.items()):
                exitcode = worker.process.exitcode
                worker.relay(echo)
                if exitcode is not None:
                    worker.relay(echo)  # what it sent before it ended
                    worker.close()
                    del running[i]
                    free_slots.append(slot_of.pop(i))
                    if exitcode == 0:
                        done.add(i)
                    else:
                        failed.append(todo[i].name)
                        echo(f"[{i + 1}/{n} {todo[i].name}] failed (exit {exitcode}; its output: "
                             f"{runs[i].root / VARIANT_LOG}); the others go on")
            time.sleep(0.2)
    except BaseException:
        for worker in running.values():
            worker.process.terminate()  # SIGTERM: the worker marks its stage interrupted and lets the lock go
        for worker in running.values():
            worker.process.join()
            worker.relay(echo)
            worker.close()
        raise
    if failed:
        raise FileError(f"sweep: {len(failed)} of {n} variants failed ({', '.join(failed)}); each one's output is "
                        f"in its folder's {VARIANT_LOG}; rerun the same command to resume")


class _Worker:
    """One variant's `run_pipeline` in a process of its own (spawned: a fresh interpreter, whatever threads
    and CUDA state this one has); its StageEvents and its error line come back on a queue."""

    def __init__(self, v: Variant, run: Run, config: Path, to_stage: str | None, tag: str, gpu: int | None,
                 draw: bool = True):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.tag = tag
        self.queue = ctx.SimpleQueue()
        run.root.mkdir(parents=True, exist_ok=True)
        if not (run.root / "config.yaml").exists():  # a folder with config.yaml is a run, one with only sweep.log is not
            run.save_config()
        self.process = ctx.Process(target=_variant, name=f"wsss sweep {v.name}", daemon=False,
                                   args=(str(config), str(run.root), dict(v.overrides), to_stage, self.queue,
                                         str(run.root / VARIANT_LOG), draw))
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpu is not None:  # in the environment the worker starts with, before it imports anything
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        try:
            self.process.start()
        finally:
            if gpu is not None:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def close(self) -> None:
        """The queue's pipe and the process's handles, once it has ended and said everything."""
        self.queue.close()
        self.process.close()

    def relay(self, echo: Callable[[str], None]) -> None:
        """Echo, with the variant's tag, what the worker has sent so far."""
        while not self.queue.empty():
            kind, value = self.queue.get()
            echo(f"{self.tag} {value.short() if kind == 'event' else value}")


def _variant(config: str, root: str, overrides: dict[str, Any], to_stage: str | None, queue: Any,
             log: str, draw: bool = True) -> None:
    """A sweep worker: `wsss run` of one variant in this process, its output (tracebacks too) in the variant's
    log, its events sent to the sweep; exit 0 when it finished, 2 on an error, 130 / 143 when stopped."""
    import signal
    import traceback

    from .pipeline import Terminated, one_line, raise_terminated, run_pipeline

    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    signal.signal(signal.SIGTERM, raise_terminated)  # the sweep stopping: handled like Ctrl-C
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    code = 0
    try:
        run_pipeline(config, root, to_stage=to_stage, overrides=overrides, draw=draw,
                     echo=lambda e: (print(e.line(), flush=True), queue.put(("event", e))))
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, Terminated) else 130
    except BaseException as e:  # noqa: BLE001  (reported as one line; the traceback stays in the log)
        traceback.print_exc()
        text = describe_os_error(e) if isinstance(e, OSError) else str(e) or type(e).__name__
        queue.put(("error", f"wsss: error: {one_line(text)}"))
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _stop_when_orphaned(parent: int) -> None:
    """A worker whose sweep died (killed alone) stops as if the sweep had stopped it, instead of training on."""
    import signal

    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _gpu_count() -> int:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
