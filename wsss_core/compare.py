"""`wsss compare`: what each change of an ablation did, and whether it is real
(one run alone: its scores with their intervals, the noise level of its numbers).

For a sweep folder (or several run folders): the parameters that differ
between the runs, every kept evaluation's mIoU per row with a bootstrap
confidence interval, the difference from a baseline row with a *paired*
interval (the same resampled images for both), per-class differences, and the
time per stage. A difference whose interval holds 0 is marked as such: with 59
val images, a point of mIoU is often noise.

Runs that differ only in seed keys (`seed`, `<section>.seed`: replicates, as
`wsss sweep --seeds` makes them) form one row: the mean over its seeds, their
standard deviation, and an interval from a two-level bootstrap (seeds, then
images; `bootstrap`). A row of one seed says so: its interval is over images
only, and says nothing of another training run.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bootstrap import (MAX_RESAMPLES, RESAMPLES, SEED, Interval, bootstrap_weights, paired_difference,
                        replicate_row)
from .config import ConfigError, load_config
from .store import Run, config_diff, read_json


@dataclass
class Comparison:
    """Everything `wsss compare` shows, as data (the notebook draws the same).

    A row is one experiment: a run, or the runs that differ from it only in seed keys (its replicates)."""

    runs: list[str]  # the rows, named by their first run
    baseline: str  # a row
    differs: dict[str, dict[str, str]]  # dotted key -> {row: value}, only keys that differ between rows
    evaluations: list[str]  # "stage/key" in pipeline order
    labels: dict[str, str]  # evaluation -> "pseudo masks (train)"
    members: dict[str, list[str]] = field(default_factory=dict)  # row -> its runs (one per seed)
    seeds: dict[str, dict[str, str]] = field(default_factory=dict)  # row -> run -> its seed keys ("" : none set)
    miou: dict[str, dict[str, Interval]] = field(default_factory=dict)  # evaluation -> row -> mean and interval
    delta: dict[str, dict[str, Interval]] = field(default_factory=dict)  # evaluation -> row -> paired difference
    class_delta: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)  # eval -> row -> class
    classes: list[str] = field(default_factory=list)
    seconds: dict[str, dict[str, float | None]] = field(default_factory=dict)  # run -> stage -> seconds
    resamples: int = RESAMPLES
    seed: int = SEED

    def n_seeds(self, row: str) -> int:
        return len(self.members.get(row, [row]))


# --------------------------------------------------------------------------- finding runs
def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders: a sweep folder stands for its variants (in grid order)."""
    from .data.ids import id_problem
    from .store import FileError

    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "sweep.json").is_file():
            record = read_json(p / "sweep.json")
            try:
                names = [str(v["name"]) for v in record["variants"]]
            except (KeyError, TypeError):
                raise FileError(f"{p / 'sweep.json'}: not a sweep record written by wsss") from None
            bad = [n for n in names if id_problem(n)]
            if bad:
                raise FileError(f"{p / 'sweep.json'}: variant {bad[0]!r} is not a folder name of the sweep")
            out += [p / n for n in names if (p / n / "config.yaml").is_file()]  # variants that have started
        elif (p / "config.yaml").is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: neither a run folder (config.yaml) nor a sweep folder (sweep.json)")
    if not out:
        raise ConfigError(f"{', '.join(map(str, paths))}: no run (a sweep without finished variants)")
    real = [os.path.realpath(p) for p in out]
    twice = [p for p, r in zip(out, real) if real.count(r) > 1]
    if twice:
        raise ConfigError(f"{twice[0]}: the same run is named twice; compare each run once")
    return out


def _open(root: Path) -> Run:
    from .stages import open_run

    return open_run(root, load_config(root / "config.yaml"))


def check_comparison_out(out: Path, paths: Sequence[str | Path]) -> None:
    """Refuse (one line) an --out that could replace something of value: not an .html file, a folder, or a
    path inside one of the compared runs (their files are results; the sweep folder itself is fine)."""
    if out.suffix.lower() != ".html":
        raise ConfigError(f"--out {out}: the comparison is an HTML page; give a file name ending in .html")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name ending in .html")
    real = os.path.realpath(out)
    for root in find_runs(paths):
        r = os.path.realpath(root)
        if real.startswith(r.rstrip(os.sep) + os.sep):
            raise ConfigError(f"--out {out}: inside the run {root}, whose files are results; write the "
                              "comparison elsewhere (--out FILE.html)")


def compare_runs(paths: Sequence[str | Path], baseline: str | None = None, resamples: int = RESAMPLES,
                 seed: int = SEED) -> Comparison:
    """Compare the runs of `paths` (sweep folders or run folders) against `baseline` (a row's or a run's
    folder name; default the first); replicates (runs differing only in seed keys) are pooled into rows."""
    from .artifacts import scores_of
    from .config import plain
    from .stages import pipeline_order

    if not 100 <= resamples <= MAX_RESAMPLES:
        raise ConfigError(f"--resamples {resamples}: must be in [100, {MAX_RESAMPLES}] (at least 100 for a 95 % "
                          "interval; more than 100,000 changes nothing but memory)")
    if seed < 0:
        raise ConfigError(f"--seed {seed}: must be >= 0")
    roots = find_runs(paths)
    names = [_label(r, roots) for r in roots]
    runs = dict(zip(names, map(_open, roots)))
    configs = {n: plain(r.cfg) for n, r in runs.items()}
    members = replicate_rows(runs, configs)
    rows = list(members)
    if baseline is not None and baseline not in names:
        raise ConfigError(f"--baseline {baseline}: not one of the runs ({', '.join(names)})")
    base = next(r for r in rows if baseline is None or baseline in members[r])
    differs: dict[str, dict[str, str]] = {}
    for row in rows:
        for key in _differing_keys(runs[base], configs[base], configs[row]):
            differs.setdefault(key, {})
    for key in differs:
        differs[key] = {row: _value_at(configs[row], key) for row in rows}
    kept = {n: {f"{st}/{k}": s for st in pipeline_order() if r.is_done(st) for k, s in scores_of(r, st).items()}
            for n, r in runs.items()}  # only stages evaluated with the run's own parameters
    evaluations = [e for e in kept[base] if all(e in kept[n] for n in names)]
    for e in evaluations:  # paired over images: the runs must score the same classes on shared images
        for n in names:
            if kept[n][e].classes != kept[base][e].classes:
                raise ConfigError(f"{runs[n].root}: scores other classes than {runs[base].root} "
                                  f"({len(kept[n][e].classes)} against {len(kept[base][e].classes)}, "
                                  f"in {e}); runs of different datasets cannot be compared")
            if not set(kept[n][e].ids) & set(kept[base][e].ids):
                raise ConfigError(f"{runs[n].root}: no image in common with {runs[base].root} in {e}; "
                                  "runs of different datasets cannot be compared")
    c = Comparison(rows, base, differs, evaluations, {e: f"{kept[base][e].what} ({kept[base][e].split})"
                                                      for e in evaluations}, members=members,
                   seeds={row: {n: _seed_text(configs[n], runs[n].cfg) for n in members[row]} for row in rows},
                   resamples=resamples, seed=seed)
    c.classes = list(kept[base][evaluations[0]].classes) if evaluations else []
    for e in evaluations:
        c.miou[e], c.delta[e], c.class_delta[e] = compare_scores({n: kept[n][e] for n in names}, members, base,
                                                                  resamples, seed)
    c.seconds = _seconds(runs)
    return c


def compare_scores(scores: dict[str, Any], members: dict[str, list[str]], base: str, resamples: int = RESAMPLES,
                   seed: int = SEED) -> tuple[dict[str, Interval], dict[str, Interval],
                                              dict[str, dict[str, float | None]]]:
    """One evaluation of every row: its mean over seeds with the two-level interval, the paired
    difference from `base`, and the per-class difference of the mean IoU over seeds.

    `scores`: run -> `ImageScores`; `members`: row -> its runs. The images every run scored are
    compared, each run's counts looked up by image id (runs may list their images in any order)."""
    first = scores[members[base][0]]
    positions = {n: {i: k for k, i in enumerate(s.ids)} for n, s in scores.items()}
    common = [i for i in first.ids if all(i in p for p in positions.values())]
    order = {n: np.array([positions[n][i] for i in common], np.int64) for n in scores}
    w = bootstrap_weights(len(common), resamples, seed)
    rows = {row: replicate_row([scores[n] for n in runs], [order[n] for n in runs], w, [seed, k])
            for k, (row, runs) in enumerate(members.items())}
    miou = {row: r.estimate for row, r in rows.items()}
    delta = {row: paired_difference(r, rows[base]) for row, r in rows.items() if row != base}
    iou = {row: _mean_iou([scores[n].iou(order[n]) for n in runs]) for row, runs in members.items()}
    classes = first.classes
    class_delta = {row: {cl: (None if np.isnan(a) or np.isnan(b) else float(a - b))
                         for cl, a, b in zip(classes, iou[row], iou[base])} for row in delta}
    return miou, delta, class_delta


def _mean_iou(per_seed: list[np.ndarray]) -> np.ndarray:
    """Per-class IoU averaged over the seeds that have the class (NaN where none has it)."""
    a = np.stack(per_seed)
    ok = ~np.isnan(a)
    return np.where(ok.any(0), np.where(ok, a, 0.0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)


def replicate_rows(runs: dict[str, Run], configs: dict[str, Any]) -> dict[str, list[str]]:
    """Group runs into rows: a run joins the first row whose first run differs from it only in seed keys
    (and runtime fields); rows are named by their first run, in the order the runs were given."""
    rows: dict[str, list[str]] = {}
    for n in runs:
        row = next((r for r in rows if not _differing_keys(runs[r], configs[r], configs[n], seeds=False)), None)
        rows.setdefault(row or n, []).append(n)
    return rows


def _differing_keys(run: Run, old: dict, new: dict, seeds: bool = False) -> list[str]:
    """Dotted keys whose values differ between two plain configs (runtime fields left out; seed keys only
    when `seeds`)."""
    from .config import seed_keys

    skip = set() if seeds else set(seed_keys(type(run.cfg)))
    keys = [line.split(": ", 1)[0] for line in config_diff(old, new)]
    return [k for k in keys if k not in skip and _kind_of(run.cfg, k) != "runtime"]


def _seed_text(values: dict, cfg: Any) -> str:
    """The seed keys a run sets, as `seed 0, segmentation.seed 2` (the unset stage seeds left out)."""
    from .config import seed_keys

    return ", ".join(f"{k} {_value_at(values, k)}" for k in seed_keys(type(cfg)) if _value_at(values, k) != "None")


def _seconds(runs: dict[str, Run]) -> dict[str, dict[str, float | None]]:
    """Time per stage per run; a stage shared with an earlier run (the same outputs: its run id, which a
    sweep's hard links and an archive's copies keep; else the same manifest file) took no time of its own: 0."""
    import os

    from .stages import pipeline_order

    seen: set[tuple] = set()
    out: dict[str, dict[str, float | None]] = {}
    for n, r in runs.items():
        out[n] = {}
        for st in pipeline_order():
            m = r.manifest(st) or {}
            if m.get("status") != "done":
                continue
            stat = os.stat(r.folder(st) / "manifest.json")
            same = (st, m["run_id"]) if isinstance(m.get("run_id"), str) else (stat.st_dev, stat.st_ino)
            out[n][st] = 0.0 if same in seen else m.get("seconds")
            seen.add(same)
    return out


def _label(root: Path, roots: Sequence[Path]) -> str:
    """The run's folder name, with as many parent folders as it takes to tell it from the others."""
    parts = Path(os.path.abspath(root)).parts
    others = [Path(os.path.abspath(r)).parts for r in roots if r != root]
    for k in range(1, len(parts) + 1):
        if all(o[-k:] != parts[-k:] for o in others):
            return "/".join(parts[-k:])
    return str(root)


def _value_at(d: dict, key: str) -> str:
    node: Any = d
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return repr(node)


def _kind_of(cfg: Any, key: str) -> str:
    import dataclasses

    from .config import field_kind

    *parents, last = key.split(".")
    node = cfg
    for p in parents:
        node = getattr(node, p, None)
    return field_kind(type(node), last) if dataclasses.is_dataclass(node) and hasattr(node, last) else "output"


# --------------------------------------------------------------------------- showing it
def _pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def _figure(m: Interval) -> str:
    """`77.5 ± 0.6 [74.5, 80.3]` (a row of seeds), `77.5       [74.5, 80.3]*` (one seed: images only)."""
    spread = f" ± {100 * m.sd:3.1f}" if m.sd is not None else "      "
    return f"{_pct(m.value)}{spread} [{_pct(m.low)}, {_pct(m.high)}]" + ("*" if m.images_only else " ")


def comparison_table(c: Comparison) -> str:
    """The text `wsss compare` prints."""
    lines = [f"rows: {', '.join(c.runs)}   baseline: {c.baseline}"]
    if any(c.n_seeds(r) > 1 for r in c.runs):
        lines.append("seeds (runs that differ only in seed keys are one row):")
        for r in c.runs:
            lines.append(f"  {r}: {c.n_seeds(r)} seed(s): " +
                         "; ".join(f"{n} ({c.seeds[r][n] or 'no seed key'})" for n in c.members[r]))
    if c.differs:
        lines.append("what differs:")
        for key, values in c.differs.items():
            lines.append(f"  {key}: " + ", ".join(f"{n} {v}" for n, v in values.items()))
    lines.append(f"mIoU (%): mean ± sd over seeds, 95 % interval from a two-level bootstrap ({c.resamples} "
                 f"resamples: seeds, then images; seed {c.seed}); '*': one seed, the interval over images only; "
                 "differences from the baseline are paired over images; '~0' marks an interval that holds 0")
    width = max([28] + [len(r) + 1 for r in c.runs])
    for e in c.evaluations:
        lines.append(f"  {c.labels[e]}")
        for n in c.runs:
            row = f"    {n:<{width}} {c.n_seeds(n):>2} seed{'s' if c.n_seeds(n) > 1 else ' '} {_figure(c.miou[e][n])}"
            if n in c.delta[e]:
                d = c.delta[e][n]
                row += f"   {100 * d.value:+5.1f} [{100 * d.low:+5.1f}, {100 * d.high:+5.1f}]" + \
                    ("  ~0" if d.holds_zero else "")
            lines.append(row)
    lines.append("time per stage (s; 0: shared with a run above):")
    stages = list(dict.fromkeys(st for n in c.seconds for st in c.seconds[n]))
    for n in c.seconds:
        lines.append(f"  {n:<{width}} " + ", ".join(f"{st} {c.seconds[n].get(st) or 0:.0f}" for st in stages))
    return "\n".join(lines)


def _figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def comparison_html(c: Comparison) -> str:
    """A self-contained page: the table, one interval plot and one per-class heat map per evaluation."""
    from .viz import plot_class_deltas, plot_intervals

    parts = [f"<h1>Comparison</h1><pre>{html.escape(comparison_table(c))}</pre>"]
    for e in c.evaluations:
        parts.append(f"<h2>{html.escape(c.labels[e])}</h2>")
        parts.append(f'<img src="data:image/png;base64,{_figure_png(plot_intervals(c, e))}">')
        if c.class_delta[e]:
            parts.append(f'<img src="data:image/png;base64,{_figure_png(plot_class_deltas(c, e))}">')
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto} pre{font-size:12px}"
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>wsss compare</title><style>{style}</style>" \
           f"</head><body>{''.join(parts)}</body></html>\n"
