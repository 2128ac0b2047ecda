"""The registry: the only list of stages.

A stage is one module in this package (found on import: nothing else lists
it) that registers its function with `@register`, naming its folder, the
config sections it reads, its upstream stages, its notebook, its headline and,
when it has one, the config section it declares (`config=`: a frozen
dataclass of its parameters, named like the stage). The pipeline order is the
order of the stage folders (`00_data`, `01_classifier`, ...), which must put
every upstream stage first. Stages from outside the package are modules named
in $WSSS_STAGES (comma-separated), imported the same way in every process.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..config import SECTIONS, ConfigError, add_section, kept_sections
from ..store import StageSpec, UnknownStageError

if TYPE_CHECKING:
    from ..config import Config
    from ..store import Run, StageResult

StageFn = Callable[["Config", "Run"], "StageResult"]
CheckFn = Callable[["Config", Any], None]  # (cfg, dataset) -> None or ConfigError/DataError
HeadlineFn = Callable[[dict], str]
EVERY = "*"  # upstream / reads_metrics: every stage that comes before this one
STAGES_ENV = "WSSS_STAGES"


@dataclass(frozen=True)
class Stage:
    """A registered stage: what the run store needs (`spec`) and what runs and shows it.

    `after_notebook(executed_notebook, run)`: what `wsss run` does once the
    stage's notebook has run (the report exports itself to HTML);
    `summary(run)`: lines `wsss run` prints when it finishes (the report's table)."""

    spec: StageSpec
    fn: StageFn
    notebook: str | None = None  # notebooks/<file> or an absolute path; None: run by the CLI only
    check: CheckFn | None = None
    headline: HeadlineFn | None = None
    after_notebook: Callable[[Path, Run], None] | None = None
    summary: Callable[[Run], list[str]] | None = None

    @property
    def name(self) -> str:
        return self.spec.name


STAGES: dict[str, Stage] = {}


def register(name: str, folder: str, sections: tuple[str, ...], upstream: tuple[str, ...] | str = (), *,
             config: type | None = None, notebook: str | None = None, check: CheckFn | None = None,
             headline: HeadlineFn | None = None, content: Callable[[Config], dict] | None = None,
             explain_content: Callable[[dict, dict], list[str]] | None = None, ignore: tuple[str, ...] = (),
             reads_metrics: tuple[str, ...] | str = (), after_notebook: Callable[[Path, Run], None] | None = None,
             summary: Callable[[Run], list[str]] | None = None, version: int = 1) -> Callable[[StageFn], StageFn]:
    """Decorator adding a stage function to the registry.

    `config`: the section this stage declares (a frozen dataclass, YAML key = `name`);
    `upstream` / `reads_metrics`: stage names, or `EVERY` for every earlier stage;
    `ignore`: dotted fields of `sections` that do not change this stage's outputs;
    `reads_metrics`: upstream stages whose evaluation results this stage's
    evaluation uses (their evaluation parameters re-evaluate it too);
    `version`: raise it when a fix changes the stage's outputs for the same parameters, so that finished
    runs (and a sweep's --reuse) redo the stage instead of mixing outputs of the old and the new code."""

    def deco(fn: StageFn) -> StageFn:
        if config is not None:
            add_section(name, config, order=folder)
        spec = StageSpec(name, folder, tuple(sections), upstream, content, explain_content,  # type: ignore[arg-type]
                         tuple(ignore), reads_metrics, version)  # type: ignore[arg-type]
        STAGES[name] = Stage(spec, fn, notebook, check, headline, after_notebook, summary)
        _order()
        return fn

    return deco


_REGISTERED: dict[str, int] = {}  # stage name -> when it was first registered


def _order() -> None:
    """Sort the registry by the folders' numbers (the pipeline order; stages sharing a number, as
    06_segmentation and 06_bound, in the order they were registered) and check that every upstream
    stage comes first."""
    for name in STAGES:
        _REGISTERED.setdefault(name, len(_REGISTERED))
    ordered = dict(sorted(STAGES.items(), key=lambda kv: (kv[1].spec.folder.split("_")[0], _REGISTERED[kv[0]])))
    STAGES.clear()
    STAGES.update(ordered)
    names = list(STAGES)
    for k, s in enumerate(STAGES.values()):
        ups = s.spec.upstream
        for u in () if ups == EVERY else ups:
            if u in STAGES and names.index(u) > k:
                raise ValueError(f"stage {s.name!r} ({s.spec.folder}) comes before its upstream stage {u!r} "
                                 f"({STAGES[u].spec.folder}): number the folders in pipeline order")


def specs() -> dict[str, StageSpec]:
    """Every stage's spec, in pipeline order, with `EVERY` resolved to the stages before it."""
    names = list(STAGES)
    out = {}
    for k, (name, s) in enumerate(STAGES.items()):
        before = tuple(n for n in names[:k] if STAGES[n].spec.upstream != EVERY)
        spec = s.spec
        out[name] = StageSpec(spec.name, spec.folder, spec.sections,
                              before if spec.upstream == EVERY else tuple(spec.upstream), spec.content,
                              spec.explain_content, spec.ignore,
                              before if spec.reads_metrics == EVERY else tuple(spec.reads_metrics), spec.version)
    return out


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStageError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def pipeline_order() -> list[str]:
    """Stage names in the order the pipeline runs them."""
    return list(STAGES)


def stage_table() -> str:
    """The stages as a Markdown table, from the registry (`wsss stages`): the list a contributor reads."""
    rows = ["| stage | folder | module | notebook | config section | upstream | what it does |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, spec in specs().items():
        s = STAGES[name]
        module = s.fn.__module__.removeprefix("wsss_core.").replace(".", "/") + ".py"
        notebook = f"`{Path(s.notebook).stem}`" if s.notebook else "-"
        section = f"`{name}`" if name in SECTIONS else "-"
        doc = (s.fn.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        rows.append(f"| {name} | `{spec.folder}` | `{module}` | {notebook} | {section} | "
                    f"{', '.join(spec.upstream) or '-'} | {' '.join(doc.split())} |")
    return "\n".join(rows)


DISCOVERY_PROBLEMS: list[str] = []  # the $WSSS_STAGES modules that failed to import, one line each


def discover() -> None:
    """Import every stage module of this package, then those named in $WSSS_STAGES.

    A user's module that fails to import (any error: a typo, a syntax error)
    is recorded, not raised: the package is imported by every notebook kernel,
    and the failure must reach the user as one line (`check_discovered`), not
    as a traceback at `import wsss_core`."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{info.name}")
    DISCOVERY_PROBLEMS.clear()
    for module in filter(None, (m.strip() for m in os.environ.get(STAGES_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001  (the user's code: whatever it raises is reported)
            where = f"{e.filename}:{e.lineno}: " if isinstance(e, SyntaxError) and e.filename else ""
            DISCOVERY_PROBLEMS.append(f"${STAGES_ENV}: cannot import stage module {module!r} "
                                      f"({where}{type(e).__name__}: {e})")


def check_discovered() -> None:
    """Raise ConfigError (one line) if a stage module named in $WSSS_STAGES failed to import."""
    if DISCOVERY_PROBLEMS:
        raise ConfigError(DISCOVERY_PROBLEMS[0])


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """Register stages for a while (tests): the registry and the config sections are restored after."""
    stages = dict(STAGES)
    with kept_sections():
        try:
            yield
        finally:
            STAGES.clear()
            STAGES.update(stages)
