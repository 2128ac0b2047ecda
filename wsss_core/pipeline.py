"""`wsss run`: the stage notebooks in pipeline order, executed with papermill.

Each stage's notebook (from the stage registry) is executed into
`<run_dir>/notebooks/` with `config`, `run_dir` (and `overrides`) injected;
papermill only warns about names a notebook does not declare, so they are
checked against `papermill.inspect_notebook` first. A stage that is done
with unchanged inputs and parameters is skipped without starting a kernel;
a changed parameter reruns that stage and everything downstream. The
terminal shows one line per stage and the stage's progress bars; the full
output stays in the executed notebook. A failing stage stops the run with
one line naming the notebook, the cell and the error.

Under torchrun (`torchrun --nproc_per_node N -m wsss_core.cli run ...`),
every process runs the stage functions in order (per-image stages share the
images, trained stages train with DDP; a barrier after each stage), then
rank 0 executes the notebooks that are missing or older than their stages'
manifests, which find their stages done and draw the pictures.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

from . import runtime
from .config import Config, ConfigError, dump_config, load_config
from .stages import STAGES, check_stage, dataset, headline, open_run, pipeline_order, run_stage
from .store import LOCK_TOKEN_ENV, FileError, Run, StaleUpstreamError, describe_os_error, file_errors, write_text

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

# notebooks that are not a pipeline stage (opened by hand; executed in the tests)
TOOL_NOTEBOOKS: tuple[str, ...] = ("cam_inspector.ipynb", "09_compare.ipynb")


class StageFailed(RuntimeError):
    """A stage's notebook raised; the message is one line naming notebook and cell."""


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


class ProgressFilter:
    """A file-like sink for a kernel's stdout that passes on only progress bars
    and the stage's own `[wsss]` lines (indented), not the notebook's prints."""

    _BAR = re.compile(r"\d+%\||\|\s*\d+/\d+|\d+/\d+ \[")
    _OWN = ("running", "re-evaluating", "done in", "already done")

    def __init__(self, out: TextIO):
        self.out = out
        self.buf = ""
        self.bar_open = False

    def write(self, text: str) -> int:
        self.buf += text
        while True:
            m = re.search(r"[\r\n]", self.buf)
            if not m:
                break
            segment, end, self.buf = self.buf[: m.start()], m.group(), self.buf[m.end():]
            self._emit(segment, end)
        return len(text)

    def _emit(self, segment: str, end: str) -> None:
        s = segment.strip()
        if not s:
            return
        if self._BAR.search(s):
            self.out.write("\r  " + s + ("\n" if end == "\n" else ""))
            self.bar_open = end != "\n"
        elif s.startswith("[wsss]") and not any(w in s for w in self._OWN):
            self.out.write(("\n" if self.bar_open else "") + "  " + s + "\n")
            self.bar_open = False
        self.out.flush()

    def flush(self) -> None:
        if self.bar_open:
            self.out.write("\n")
            self.bar_open = False
        self.out.flush()


def execute_notebook(
    notebook: str | Path,
    output: str | Path,
    parameters: Mapping[str, Any],
    log_output: bool = True,
    stdout: TextIO | None = None,
) -> Path:
    """Execute one notebook with papermill after checking its parameter names.

    `stdout` receives the kernel's filtered output (progress bars, `[wsss]`
    lines); the executed notebook keeps everything.
    """
    import papermill

    notebook = Path(notebook).resolve()
    output = Path(os.path.abspath(output))  # not resolved: a link is replaced, never written through
    check_notebook_parameters(notebook, list(parameters))
    sink = ProgressFilter(stdout or sys.stdout) if log_output else None
    log = output.with_suffix(".kernel.log")
    with file_errors(output.parent, "creating"):
        output.parent.mkdir(parents=True, exist_ok=True)
        # papermill rewrites its output in place: start from a new file, so that an executed notebook
        # hard-linked into another run (a sweep's shared stage) is never changed
        output.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
    # the kernel's own stderr (ipykernel warnings) goes to a log file beside the executed notebook
    with _env(WSSS_BATCH="1"), _stderr_to(log):  # env inherited by the kernel: sparse progress lines
        try:
            papermill.execute_notebook(
                str(notebook), str(output), parameters=dict(parameters), cwd=str(notebook.parent),
                progress_bar=False, kernel_name="python3", stdout_file=sink,
            )
        except OSError as e:  # papermill saving the executed notebook (a full disk, a read-only folder)
            raise FileError(describe_os_error(e, e.filename or output, "writing")) from None
        finally:
            if sink is not None:
                sink.flush()
    return output


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
    return f"stage {name} failed ({out}, {where}): {last[-1] if last else err.ename}"


def run_pipeline(
    config: str | Path,
    run_dir: str | Path,
    from_stage: str | None = None,
    to_stage: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    log_output: bool = True,
    force: Sequence[str] = (),
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Execute the stage notebooks in order; returns the run directory.

    Parameters and stage names are validated before anything is written. A
    stage done with the same inputs is skipped; `force` names stages to redo
    from scratch. Raises StageFailed (one line) when a notebook fails.
    """
    import papermill

    echo = echo or (lambda s: print(s, flush=True))
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
        out = run.root / "notebooks" / notebook_path(STAGES[name].notebook).name  # type: ignore[arg-type]
        run.inside(out), run.inside(out.with_suffix(".kernel.log"))  # never written through a link out of the run
    distributed = runtime.world_size() > 1  # under torchrun: every process runs the stage functions
    if distributed and not runtime.is_main():
        echo = lambda s: None  # noqa: E731  (one line per stage, from rank 0)
    with run.lock("wsss run"), _env(**{LOCK_TOKEN_ENV: run.lock_token}), _ctrl_c_reaches_kernels() as ctrl_c:
        if distributed:
            runtime.init_distributed(runtime.resolve_device(cfg.device))
            runtime.barrier()  # every process has read the run folder before rank 0 changes it
        # Reasons are taken before anything runs, so a downstream stage names the root cause
        # ("00_data was made from other data") rather than "00_data was rerun since".
        for name in (n for n in force if n in stages and run.is_main):  # a damaged manifest of a forced stage:
            if run.forget_damaged_manifest(name):  # forcing repairs it (rank 0 only, before the others look)
                echo(f"[wsss] {run.folder(name) / 'manifest.json'}: unreadable, removed (the stage is forced)")
        runtime.barrier()
        reasons = {name: run.why_not_done(name) for name in stages}
        done_before = {name for name in stages if name not in force and run.is_done(name)}
        runtime.barrier()
        try:
            _run_stages(stages, force, reasons, done_before, distributed, run, cfg, log_output, ctrl_c, echo)
        except BaseException:
            if distributed:
                runtime.leave_distributed(wait=False)  # an undestroyed gloo group aborts the exit
            raise
        if distributed:
            runtime.leave_distributed(wait=True)
            if run.is_main:  # the pictures: each notebook finds its stages done and draws
                _draw_notebooks(stages, run, cfg, log_output, ctrl_c, echo)
        if ctrl_c.is_set():  # swallowed during the last stage: still not a clean finish
            raise KeyboardInterrupt
    return run.root


def _run_stages(stages: list[str], force: Sequence[str], reasons: dict[str, str | None], done_before: set[str],
                distributed: bool, run: Run, cfg: Config, log_output: bool, ctrl_c: threading.Event,
                echo: Callable[[str], None]) -> None:
    """The stages in order: each one's notebook, or under torchrun its function in every process."""
    for k, name in enumerate(stages, 1):
        if ctrl_c.is_set():  # a Ctrl-C the kernel client swallowed still stops the run here
            raise KeyboardInterrupt
        tag = f"[wsss] ({k}/{len(stages)}) {name:<18}"
        if name not in force and run.is_done(name):
            m = run.manifest(name) or {}
            did = "skipped (done)" if name in done_before else \
                f"done in {m.get('seconds') or 0:.0f} s (same notebook)"
            echo(f"{tag} {did}{_with(headline(name, m.get('metrics', {})))}")
            continue
        run.check_upstream(name)
        why = "forced" if name in force else \
            (reasons[name] or run.why_not_done(name) or "evaluation parameters changed")
        if name in force and not distributed:
            run.begin(name, fresh=True)  # checked above: a bad value does not cost the previous results
        echo(f"{tag} running ({why})")
        t0 = time.perf_counter()
        if distributed:
            run_stage(name, cfg, run, force=name in force, quiet=True)  # the lines are this loop's
            runtime.barrier()  # rank 0 has written the manifest before any process reads it
        else:
            _stage_notebook(name, cfg, run, log_output, ctrl_c)
        m = run.manifest(name) or {}
        # a notebook serving several stages: each line gets its stage's own time
        shared = any(s.notebook == STAGES[name].notebook for n, s in STAGES.items() if n != name)
        took = (m.get("seconds") or 0) if shared or distributed else time.perf_counter() - t0
        echo(f"{tag} done in {took:.0f} s{_with(headline(name, m.get('metrics', {})))}")


def _draw_notebooks(stages: list[str], run: Run, cfg: Config, log_output: bool, ctrl_c: threading.Event,
                    echo: Callable[[str], None]) -> None:
    """After a torchrun run: execute (in this process) each notebook whose executed copy is missing or older
    than one of its stages' manifests, so stages done by an earlier, failed run get their pictures too."""
    todo: dict[str, str] = {}  # notebook -> the first of its stages
    for name in stages:
        nb = STAGES[name].notebook
        out = run.root / "notebooks" / notebook_path(nb).name  # type: ignore[arg-type]
        manifest = run.folder(name) / "manifest.json"
        if nb and run.is_done(name) and (not out.is_file() or out.stat().st_mtime < manifest.stat().st_mtime):
            todo.setdefault(nb, name)
    if todo:
        echo(f"[wsss] the pictures: executing {len(todo)} notebooks in this process")
    with _env(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0"):  # the kernels are not torchrun processes
        for name in todo.values():
            _stage_notebook(name, cfg, run, log_output, ctrl_c)


def _config_snapshot(run: Run, cfg: Config) -> Path:
    """The resolved config (overrides applied, paths absolute) as <run>/notebooks/config.yaml: what the
    notebooks of a `wsss run` load, so a parameter file edited while the run goes on (another experiment
    being set up) does not reach the stages still to come; also what an executed notebook names. Written
    just before a notebook executes (its stage's checks passed), never by a refused run."""
    path = run.inside(run.root / "notebooks" / "config.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, dump_config(cfg))
    return path


def _stage_notebook(name: str, cfg: Config, run: Run, log_output: bool,
                    ctrl_c: threading.Event) -> None:
    """Execute stage `name`'s notebook into the run's notebooks/ folder (which
    runs the stage, or finds it done and draws its pictures), then the stage's
    after-notebook step. Failures are one line."""
    import papermill

    nb = notebook_path(STAGES[name].notebook)  # type: ignore[arg-type]
    out = run.root / "notebooks" / nb.name
    params: dict[str, Any] = {"config": str(_config_snapshot(run, cfg)), "run_dir": str(run.root)}
    try:
        execute_notebook(nb, out, params, log_output=log_output)
    except papermill.PapermillExecutionError as e:
        if e.ename == "KeyboardInterrupt" or ctrl_c.is_set():  # Ctrl-C, forwarded to the kernel
            raise KeyboardInterrupt from None
        if e.ename == "StaleUpstreamError":
            raise StaleUpstreamError(e.evalue) from None
        raise StageFailed(_failure_line(name, out, e)) from None
    if (run.manifest(name) or {}).get("status") != "done":
        raise StageFailed(f"stage {name}: its notebook {out} finished without running it")
    if STAGES[name].after_notebook is not None:
        STAGES[name].after_notebook(out, run)


def _with(text: str) -> str:
    return f": {text}" if text else ""
