"""Run the stage notebooks in order with papermill.

Each notebook is executed into `<run_dir>/notebooks/` with its parameters
injected. papermill only warns about parameters a notebook does not declare;
we check the names against `papermill.inspect_notebook` first and fail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import Config, ConfigError, load_config
from .stages import STAGES, open_run
from .store import Run

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

# stage name -> notebook file, in pipeline order
NOTEBOOKS: dict[str, str] = {
    "data": "00_data.ipynb",
    "classifier": "01_classifier.ipynb",
    "cams": "02_cams.ipynb",
    "crf": "03_crf.ipynb",
}

# notebooks that are not a pipeline stage (opened by hand; executed in the tests)
TOOL_NOTEBOOKS: tuple[str, ...] = ("cam_inspector.ipynb",)


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
    order = [s for s in STAGES if s in NOTEBOOKS]
    for s in (from_stage, to_stage):
        if s is not None and s not in order:
            raise ConfigError(f"unknown stage {s!r}; stages with notebooks: {', '.join(order)}")
    i = order.index(from_stage) if from_stage else 0
    j = order.index(to_stage) if to_stage else len(order) - 1
    if i > j:
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage}")
    return order[i : j + 1]


def check_notebook_parameters(notebook: Path, names: Sequence[str]) -> None:
    """Fail if any injected name is not declared in the notebook's parameters cell."""
    import papermill

    declared = set(papermill.inspect_notebook(str(notebook)))
    if not declared:
        raise ConfigError(f"{notebook}: no cell tagged 'parameters'")
    unknown = sorted(set(names) - declared)
    if unknown:
        raise ConfigError(
            f"{notebook}: unknown parameter(s) {', '.join(unknown)}; "
            f"the notebook declares: {', '.join(sorted(declared))}"
        )


def execute_notebook(
    notebook: str | Path,
    output: str | Path,
    parameters: Mapping[str, Any],
    log_output: bool = True,
) -> Path:
    """Execute one notebook with papermill after checking its parameter names."""
    import papermill

    notebook = Path(notebook).resolve()
    output = Path(output).resolve()
    check_notebook_parameters(notebook, list(parameters))
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ["WSSS_BATCH"] = "1"  # inherited by the kernel: progress bars print sparse lines
    papermill.execute_notebook(
        str(notebook),
        str(output),
        parameters=dict(parameters),
        cwd=str(notebook.parent),
        log_output=log_output,
        progress_bar=False,
        kernel_name="python3",
    )
    return output


def run_pipeline(
    config: str | Path,
    run_dir: str | Path,
    from_stage: str | None = None,
    to_stage: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    log_output: bool = True,
) -> Path:
    """Execute the stage notebooks in order; returns the run directory.

    Parameters are validated (and the run directory created) before any
    notebook starts, so a bad file fails at once.
    """
    config = Path(config).resolve()
    cfg = load_config(config, overrides)  # fail fast on bad params
    run = open_run(run_dir, cfg)
    stages = select_stages(from_stage, to_stage)
    for k, name in enumerate(stages, 1):
        nb = NOTEBOOK_DIR / NOTEBOOKS[name]
        out = run.root / "notebooks" / nb.name
        print(f"[wsss] ({k}/{len(stages)}) {nb.name} -> {out}", flush=True)
        params: dict[str, Any] = {"config": str(config), "run_dir": str(run.root)}
        if overrides:
            params["overrides"] = dict(overrides)
        execute_notebook(nb, out, params, log_output=log_output)
    return run.root
