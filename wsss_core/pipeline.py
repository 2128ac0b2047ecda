"""`wsss run`: the stages in pipeline order, in this process; then their notebooks draw.

Each stage runs through `run_stage` (the function its notebook calls) and
hands back its StageResult; a stage done with unchanged inputs and
parameters is skipped, a changed parameter reruns that stage and everything
downstream. Once every stage a notebook serves is done, the notebook is
executed with papermill into `<run_dir>/notebooks/` (`config`, `run_dir`
injected): its `run_stage` calls find their stages done, and it draws their
pictures from the stage outputs. The terminal shows one line per stage
(StageEvent values: a sweep receives them from its worker processes) and the
stage's progress bars. A stage that raises stops the run with one line naming
it (StageFailed); a stale upstream, bad input and file-system errors keep their
own one-line errors.

Under torchrun (`torchrun --nproc_per_node N -m wsss_core.cli run ...`) every
process runs the same loop (per-image stages share the images, trained stages
train with DDP; a barrier after each stage) and rank 0 speaks and draws.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

from . import runtime
from .config import Config, ConfigError, dump_config, load_config
from .data.errors import DataError
from .stages import STAGES, check_stage, dataset, headline, open_run, pipeline_order, run_stage
from .store import (LOCK_TOKEN_ENV, FileError, Run, RunLockedError, StageResult, StaleUpstreamError,
                    describe_os_error, file_errors, write_text)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

# notebooks that are not a pipeline stage (opened by hand; executed in the tests)
TOOL_NOTEBOOKS: tuple[str, ...] = ("cam_inspector.ipynb", "09_compare.ipynb")


class StageFailed(RuntimeError):
    """A stage, or the notebook drawing it, raised; the message is one line naming the stage (and the
    notebook and cell)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system, or a sweep, stopping the job): handled like Ctrl-C."""


def raise_terminated(signum: int, frame: Any) -> None:
    """The SIGTERM handler of `wsss` and of a sweep's workers."""
    raise Terminated


def one_line(text: str) -> str:
    """Error messages are one printable line, whatever a path or a value holds
    (line breaks folded, characters no terminal can encode escaped)."""
    text = " ".join(text.split()) if "\n" in text or "\r" in text else text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def notebook_path(notebook: str) -> Path:
    """A stage's notebook: a file of notebooks/, or an absolute path (a stage from outside the package)."""
    return NOTEBOOK_DIR / notebook


def stage_notebooks() -> dict[str, str]:
    """stage name -> notebook file, in pipeline order (stages that have one)."""
    return {name: s.notebook for name, s in STAGES.items() if s.notebook}


def notebook_setup(
    config: str | Path,
    run_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    knobs: Mapping[str, Any] | None = None,
) -> tuple[Config, Run]:
    """What every notebook does first: load the config with the dotted
    `overrides` and then the non-None `knobs` (`{"cams.scales": None}` means:
    take it from the file), and open the run directory."""
    merged = dict(overrides or {})
    merged.update({k: v for k, v in (knobs or {}).items() if v is not None})
    cfg = load_config(config, merged)
    return cfg, open_run(run_dir, cfg)


def select_stages(from_stage: str | None = None, to_stage: str | None = None) -> list[str]:
    """The stages between `from_stage` and `to_stage` inclusive, in order."""
    order = [s for s in pipeline_order() if STAGES[s].notebook]
    for flag, s in (("--from", from_stage), ("--to", to_stage)):
        if s is not None and s not in order:
            raise ConfigError(f"{flag} {s}: unknown stage; stages: {', '.join(order)}")
    i = order.index(from_stage) if from_stage else 0
    j = order.index(to_stage) if to_stage else len(order) - 1
    if i > j:
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage}")
    return order[i : j + 1]


def check_notebook_parameters(notebook: Path, names: Sequence[str]) -> None:
    """Fail if any injected name is not declared in the notebook's parameters cell."""
    import papermill

    try:
        declared = set(papermill.inspect_notebook(str(notebook)))
    except (ValueError, OSError) as e:  # not a notebook, or one without a kernel
        raise ConfigError(f"{notebook}: cannot read its parameters ({' '.join(str(e).split())})") from None
    if not declared:
        raise ConfigError(f"{notebook}: no cell tagged 'parameters'")
    unknown = sorted(set(names) - declared)
    if unknown:
        raise ConfigError(
            f"{notebook}: unknown parameter(s) {', '.join(unknown)}; "
            f"the notebook declares: {', '.join(sorted(declared))}"
        )


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Set environment variables for the kernels started inside the block."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is not None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute_notebook(notebook: str | Path, output: str | Path, parameters: Mapping[str, Any]) -> Path:
    """Execute one notebook with papermill after checking its parameter names.

    The executed notebook (everything it printed and drew) replaces `output`
    only when every cell ran: papermill writes a hidden partial copy first, and
    a notebook that fails is kept as `<name>.failed.ipynb` (its traceback in the
    failing cell) while `output` is removed, so the next run draws it again. The
    kernel's own stderr goes to a `.kernel.log` beside it.
    """
    import papermill

    notebook = Path(notebook).resolve()
    output = Path(os.path.abspath(output))  # not resolved: a link is replaced, never written through
    check_notebook_parameters(notebook, list(parameters))
    log = output.with_suffix(".kernel.log")
    partial = output.with_name(f".{output.name}.partial")
    failed = failed_notebook(output)
    with file_errors(output.parent, "creating"):
        output.parent.mkdir(parents=True, exist_ok=True)
        # papermill rewrites its output in place: a new file each time, so that an executed notebook
        # hard-linked into another run (a sweep's shared stage) is never changed
        for p in (partial, log):
            p.unlink(missing_ok=True)
    # the kernel's own stderr (ipykernel warnings) goes to a log file beside the executed notebook
    with _env(WSSS_BATCH="1"), _stderr_to(log):  # env inherited by the kernel: sparse progress lines in the notebook
        try:
            papermill.execute_notebook(
                str(notebook), str(partial), parameters=dict(parameters), cwd=str(notebook.parent),
                progress_bar=False, kernel_name="python3",
            )
        except papermill.PapermillExecutionError:
            with file_errors(output, "writing"):
                if partial.is_file():
                    os.replace(partial, failed)
                output.unlink(missing_ok=True)
            raise
        except OSError as e:  # papermill saving the executed notebook (a full disk, a read-only folder)
            partial.unlink(missing_ok=True)
            raise FileError(describe_os_error(e, output, "writing")) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    with file_errors(output, "writing"):
        os.replace(partial, output)
        failed.unlink(missing_ok=True)
    return output


def failed_notebook(output: Path) -> Path:
    """Where a notebook that failed is kept (`03_crf.ipynb` -> `03_crf.failed.ipynb`)."""
    return output.with_suffix(".failed.ipynb")


@contextlib.contextmanager
def _ctrl_c_reaches_kernels() -> Iterator[threading.Event]:
    """Forward Ctrl-C to the running notebook's kernel, then interrupt as usual.

    Jupyter starts kernels in their own session, so a terminal's Ctrl-C reaches
    only this process; the kernel would train on. The returned event stays set,
    so an interrupt that the kernel client swallows still stops the run at the
    next stage (seen under load on 2 cores).
    """
    hit = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield hit
        return
    import psutil

    def on_sigint(signum: int, frame: Any) -> None:
        hit.set()
        for child in psutil.Process().children():  # the kernel (jupyter's launcher is this process)
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGINT)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started with Ctrl-C ignored (a background job of a script): keep it
        yield hit
        return
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at `path` (child processes inherit it), then back."""
    sys.stderr.flush()
    with file_errors(path, "writing"), open(path, "w") as fh:
        saved = os.dup(2)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _failure_line(name: str, out: Path, err: Any) -> str:
    last = f"{err.ename}: {err.evalue}".strip().splitlines()
    where = f"cell {err.exec_count}" if err.exec_count is not None else f"cell index {err.cell_index}"
    return (f"stage {name}: its notebook failed drawing ({failed_notebook(out)}, {where}): "
            f"{last[-1] if last else err.ename}")


@dataclass(frozen=True)
class StageEvent:
    """What `wsss run` says about a stage, as a value: the terminal prints `line()`, a sweep tags `short()`.

    kind: "skipped" (done with these inputs), "running" (`detail`: why), "done" (`detail`: the headline,
    `seconds`: the stage's time), "note" (`detail`: a line about the run, e.g. a notebook left undrawn)."""

    kind: Literal["skipped", "running", "done", "note"]
    stage: str = ""
    index: int = 0
    total: int = 0
    detail: str = ""
    seconds: float | None = None

    def _rest(self) -> str:
        if self.kind == "running":
            return f"running ({self.detail})"
        if self.kind == "skipped":
            return f"skipped (done){_with(self.detail)}"
        return f"done in {self.seconds or 0:.0f} s{_with(self.detail)}"

    def short(self) -> str:
        """`pseudo_masks running (...)`: the line without the counter (a sweep prefixes its variant)."""
        return self.detail if self.kind == "note" else f"{self.stage} {self._rest()}"

    def line(self) -> str:
        """`[wsss] (3/11) pseudo_masks       running (...)`: the terminal's line."""
        if self.kind == "note":
            return f"[wsss] {self.detail}"
        return f"[wsss] ({self.index}/{self.total}) {self.stage:<18} {self._rest()}"


def print_event(event: StageEvent) -> None:
    print(event.line(), flush=True)


ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileError, StaleUpstreamError,
                                                     RunLockedError)


def run_pipeline(
    config: str | Path,
    run_dir: str | Path,
    from_stage: str | None = None,
    to_stage: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    force: Sequence[str] = (),
    echo: Callable[[StageEvent], None] | None = None,
    draw: bool = True,
) -> Path:
    """Run the stages in order in this process, each notebook drawing once its stages are done; returns the
    run directory. `draw=False` (`--no-draw`): no notebook is executed; a later run with drawing draws the
    notebooks of every stage done by then (their executed copies are missing or older than the stages).

    Parameters and stage names are validated before anything is written. A
    stage done with the same inputs is skipped; `force` names stages to redo
    from scratch. `echo` receives one StageEvent per stage (default: printed).
    Raises StageFailed (one line) when a stage or a notebook fails.
    """
    echo = echo or print_event
    config = Path(config).resolve()
    cfg = load_config(config, overrides)  # fail fast on bad params
    stages = select_stages(from_stage, to_stage)
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        raise ConfigError(f"--force {unknown[0]}: unknown stage; stages: {', '.join(STAGES)}")
    outside = [s for s in force if s not in stages]
    if outside:
        raise ConfigError(f"--force {outside[0]}: not among the stages this run does ({stages[0]} .. {stages[-1]}); "
                          "widen --from / --to or drop it")
    runtime.check_device(cfg.device)
    run = open_run(run_dir, cfg)
    run.check_folder()
    ds = dataset(cfg)  # the index files (ids, labels), checked before any stage starts
    for name in stages:
        check_stage(name, cfg, ds)
        out = _executed(run, name)
        run.inside(out), run.inside(out.with_suffix(".kernel.log"))  # never written through a link out of the run
    distributed = runtime.world_size() > 1  # under torchrun: every process runs the same loop
    if distributed and not runtime.is_main():
        echo = lambda e: None  # noqa: E731  (one line per stage, from rank 0)
    batch = None if sys.stdout.isatty() else "1"  # off a terminal (a log file, a sweep): sparse progress lines
    with run.lock("wsss run"), _env(**{LOCK_TOKEN_ENV: run.lock_token, "WSSS_BATCH": batch}), \
            _ctrl_c_reaches_kernels() as ctrl_c:
        if distributed:
            runtime.init_distributed(runtime.resolve_device(cfg.device))
            runtime.barrier()  # every process has read the run folder before rank 0 changes it
        # Reasons are taken before anything runs, so a downstream stage names the root cause
        # ("00_data was made from other data") rather than "00_data was rerun since".
        for name in (n for n in force if n in stages and run.is_main):  # a damaged manifest of a forced stage:
            if run.forget_damaged_manifest(name):  # forcing repairs it (rank 0 only, before the others look)
                echo(StageEvent("note", detail=f"{run.folder(name) / 'manifest.json'}: unreadable, removed (the "
                                "stage is forced)"))
        runtime.barrier()
        reasons = {name: run.why_not_done(name) for name in stages}
        runtime.barrier()
        try:
            _run_stages(stages, force, reasons, run, cfg, ctrl_c, echo, draw=draw and not distributed)
        except BaseException:
            if distributed:
                runtime.leave_distributed(wait=False)  # an undestroyed gloo group aborts the exit
            raise
        if distributed:
            runtime.leave_distributed(wait=True)
            if draw and run.is_main:  # after the group is gone: no process waits at a barrier while rank 0 draws
                for name in stages:
                    _draw(name, stages, run, cfg, ctrl_c, echo)
        if ctrl_c.is_set():  # swallowed during the last stage: still not a clean finish
            raise KeyboardInterrupt
    return run.root


def _run_stages(stages: list[str], force: Sequence[str], reasons: dict[str, str | None], run: Run, cfg: Config,
                ctrl_c: threading.Event, echo: Callable[[StageEvent], None], draw: bool) -> None:
    """The stages in order, in this process (every process under torchrun); with `draw`, after each one the
    notebooks whose stages are all done draw (under torchrun rank 0 draws them all at the end)."""
    previous: str | None = None  # the notebook of the stage this process ran last
    for k, name in enumerate(stages, 1):
        if ctrl_c.is_set():  # a Ctrl-C a kernel client swallowed still stops the run here
            raise KeyboardInterrupt
        if name not in force and run.is_done(name):
            m = run.manifest(name) or {}
            echo(StageEvent("skipped", name, k, len(stages), headline(name, m.get("metrics", {}))))
        else:
            run.check_upstream(name)
            why = "forced" if name in force else \
                (reasons[name] or run.why_not_done(name) or "evaluation parameters changed")
            echo(StageEvent("running", name, k, len(stages), why))
            if STAGES[name].notebook != previous:
                _as_in_a_fresh_kernel()
            previous = STAGES[name].notebook
            result = _stage(name, cfg, run, force=name in force)
            runtime.barrier()  # rank 0 has written the manifest before any process reads it
            echo(StageEvent("done", name, k, len(stages), headline(name, result.metrics), result.seconds))
        if draw and run.is_main:
            _draw(name, stages, run, cfg, ctrl_c, echo)


def _as_in_a_fresh_kernel() -> None:
    """Each notebook's stages ran in a kernel of their own before `wsss run` ran them in process, and one
    process-wide cache draws from the seeded RNG on first use (`models.efficientnet._timm_layout`): cleared
    where a kernel used to start, so every figure stays what it was (a run's stages, whatever ran before)."""
    lite0 = sys.modules.get("wsss_core.models.efficientnet")  # not imported: nothing cached yet
    if lite0 is not None:
        lite0.forget_layout()


def _stage(name: str, cfg: Config, run: Run, force: bool) -> StageResult:
    """`run_stage` in this process. Bad input, a stale upstream, a locked run and a file-system error keep
    their own one-line errors; anything else the stage raises becomes StageFailed, one line naming the
    stage (the traceback: `--debug`, or the exception's `__cause__`)."""
    try:
        return run_stage(name, cfg, run, force=force, quiet=True)
    except (*ONE_LINE_ERRORS, StageFailed, OSError):
        raise
    except Exception as e:  # noqa: BLE001  (the stage's own code: whatever it raises is reported)
        if runtime.resolve_device(cfg.device).type == "cuda":
            import torch

            torch.cuda.empty_cache()  # a caught out-of-memory keeps its tensors until the exception goes
        first = (str(e).strip().splitlines() or [""])[0]
        raise StageFailed(f"stage {name} failed: {type(e).__name__}{_with(first)}") from e


def _executed(run: Run, name: str) -> Path:
    """Where stage `name`'s executed notebook goes: <run>/notebooks/<notebook file>."""
    return run.root / "notebooks" / notebook_path(STAGES[name].notebook).name  # type: ignore[arg-type]


def _draw(name: str, stages: Sequence[str], run: Run, cfg: Config, ctrl_c: threading.Event,
          echo: Callable[[StageEvent], None]) -> None:
    """Once the last of the notebook's stages in this run is done, execute the notebook (it finds its stages
    done and draws their pictures) unless its executed copy is newer than every one of their manifests (a
    rerun that skipped them all); a stage done by an earlier, failed run gets its pictures here too."""
    nb = STAGES[name].notebook
    group = [n for n, s in STAGES.items() if s.notebook == nb]
    if [n for n in stages if n in group][-1] != name:
        return  # a later stage of this run shares the notebook: it draws then
    out = _executed(run, name)
    missing = [n for n in group if not run.is_done(n)]
    if missing:
        echo(StageEvent("note", detail=f"{out.name}: not drawn until {', '.join(missing)} is done (wsss run --from "
                                       f"{missing[0]})"))
        return
    manifests = [run.folder(n) / "manifest.json" for n in group]
    stamps = [p.stat().st_mtime_ns for p in manifests]
    if out.is_file() and out.stat().st_mtime_ns > max(stamps):
        return
    _draw_notebook(name, cfg, run, ctrl_c)
    try:
        redone = [n for n, p, t in zip(group, manifests, stamps) if p.stat().st_mtime_ns != t]
        if redone:
            raise StageFailed(f"{out}: the notebook ran stage {redone[0]} again instead of drawing it (a notebook "
                              "knob that differs from the run's parameters?)")
        for n in group:
            if STAGES[n].after_notebook is not None:
                STAGES[n].after_notebook(out, run)
    except BaseException:
        out.unlink(missing_ok=True)  # not done: the next run draws it again
        raise


def _config_snapshot(run: Run, cfg: Config) -> Path:
    """The resolved config (overrides applied, paths absolute) as <run>/notebooks/config.yaml: what the
    notebooks of a `wsss run` load, so a parameter file edited while the run goes on (another experiment
    being set up) does not reach the notebooks still to come; also what an executed notebook names."""
    path = run.inside(run.root / "notebooks" / "config.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, dump_config(cfg))
    return path


def _draw_notebook(name: str, cfg: Config, run: Run, ctrl_c: threading.Event) -> None:
    """Execute stage `name`'s notebook into the run's notebooks/ folder, in a kernel that is not a torchrun
    process. Failures are one line."""
    import papermill

    nb = notebook_path(STAGES[name].notebook)  # type: ignore[arg-type]
    out = _executed(run, name)
    params: dict[str, Any] = {"config": str(_config_snapshot(run, cfg)), "run_dir": str(run.root)}
    try:
        with _env(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0"):
            execute_notebook(nb, out, params)
    except papermill.PapermillExecutionError as e:
        if e.ename == "KeyboardInterrupt" or ctrl_c.is_set():  # Ctrl-C, forwarded to the kernel
            raise KeyboardInterrupt from None
        raise StageFailed(_failure_line(name, out, e)) from None


def _with(text: str) -> str:
    return f": {text}" if text else ""
