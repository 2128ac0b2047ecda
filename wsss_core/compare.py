"""`wsss compare`: what each change of an ablation did, and whether it is real
(one run alone: its scores with their intervals, the noise level of its numbers).

For a sweep folder (or several run folders): the parameters that differ
between the runs, every kept evaluation's mIoU per run with a bootstrap
confidence interval, the difference from a baseline run with a *paired*
interval (the same resampled images for both runs), per-class differences,
and the time per stage. A difference whose interval holds 0 is marked as
such: with 59 val images, a point of mIoU is often noise.

The bootstrap resamples images with replacement and recomputes the dataset's
IoU from the per-image counts each stage kept (`metrics.ImageScores`), so an
interval is that of the metric itself (IoU summed over images), not of a mean
of per-image scores.
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

from .config import ConfigError, load_config
from .store import Run, config_diff, read_json

RESAMPLES = 1000
MAX_RESAMPLES = 100_000
SEED = 0


@dataclass
class Interval:
    value: float
    low: float
    high: float

    @property
    def holds_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


@dataclass
class Comparison:
    """Everything `wsss compare` shows, as data (the notebook draws the same)."""

    runs: list[str]
    baseline: str
    differs: dict[str, dict[str, str]]  # dotted key -> {run: value}, only keys that differ
    evaluations: list[str]  # "stage/key" in pipeline order
    labels: dict[str, str]  # evaluation -> "pseudo masks (train)"
    miou: dict[str, dict[str, Interval]] = field(default_factory=dict)  # evaluation -> run -> interval
    delta: dict[str, dict[str, Interval]] = field(default_factory=dict)  # evaluation -> run -> paired difference
    class_delta: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)  # eval -> run -> class
    classes: list[str] = field(default_factory=list)
    seconds: dict[str, dict[str, float | None]] = field(default_factory=dict)  # run -> stage -> seconds
    resamples: int = RESAMPLES
    seed: int = SEED


def bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts: how often each image is drawn in each resample."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    w = np.zeros((resamples, n), np.int64)
    np.add.at(w, (np.arange(resamples)[:, None], idx), 1)
    return w


def resampled_miou(scores: Any, weights: np.ndarray, order: np.ndarray) -> np.ndarray:
    """mIoU of each resample: the kept counts of the images in `order`, weighted
    by how often each is drawn (classes absent from a resample are left out, as
    in `ConfusionMatrix.miou`)."""
    tp, gt, pred = (a[order] for a in scores.counts())
    t, g, p = (weights @ a for a in (tp, gt, pred))
    den = g + p - t
    return _nanmean_rows(np.where(den > 0, t / np.maximum(den, 1), np.nan))


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    n = ok.sum(1)
    return np.where(n > 0, np.where(ok, a, 0.0).sum(1) / np.maximum(n, 1), np.nan)


def _interval(value: float, samples: np.ndarray) -> Interval:
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return Interval(float(value), float(low), float(high))


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
    """Compare the runs of `paths` (sweep folders or run folders) against `baseline` (a run's folder name;
    default the first)."""
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
    if baseline is not None and baseline not in names:
        raise ConfigError(f"--baseline {baseline}: not one of the runs ({', '.join(names)})")
    base = baseline or names[0]
    runs = dict(zip(names, map(_open, roots)))
    configs = {n: plain(r.cfg) for n, r in runs.items()}
    differs: dict[str, dict[str, str]] = {}
    for n in names:
        for line in config_diff(configs[base], configs[n]):
            key = line.split(": ", 1)[0]
            if _kind_of(runs[n].cfg, key) != "runtime":
                differs.setdefault(key, {})
    for key in differs:
        differs[key] = {n: _value_at(configs[n], key) for n in names}
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
    c = Comparison(names, base, differs, evaluations, {e: f"{kept[base][e].what} ({kept[base][e].split})"
                                                      for e in evaluations}, resamples=resamples, seed=seed)
    c.classes = list(kept[base][evaluations[0]].classes) if evaluations else []
    for e in evaluations:
        positions = {n: {i: k for k, i in enumerate(kept[n][e].ids)} for n in names}
        common = [i for i in kept[base][e].ids if all(i in positions[n] for n in names)]  # paired: same images
        order = {n: np.array([positions[n][i] for i in common], np.int64) for n in names}
        w = bootstrap_weights(len(common), resamples, seed)
        samples = {n: resampled_miou(kept[n][e], w, order[n]) for n in names}
        c.miou[e] = {n: _interval(kept[n][e].miou(order[n]), samples[n]) for n in names}
        base_iou = kept[base][e].iou(order[base])
        c.delta[e], c.class_delta[e] = {}, {}
        for n in names:
            if n == base:
                continue
            c.delta[e][n] = _interval(c.miou[e][n].value - c.miou[e][base].value, samples[n] - samples[base])
            iou = kept[n][e].iou(order[n])
            c.class_delta[e][n] = {cl: (None if np.isnan(a) or np.isnan(b) else float(a - b))
                                   for cl, a, b in zip(c.classes, iou, base_iou)}
    c.seconds = _seconds(runs)
    return c


def _seconds(runs: dict[str, Run]) -> dict[str, dict[str, float | None]]:
    """Time per stage per run; a stage shared with an earlier run (the same manifest file, hard-linked by
    a sweep) took no time of its own: 0."""
    import os

    from .stages import pipeline_order

    seen: set[tuple[int, int]] = set()
    out: dict[str, dict[str, float | None]] = {}
    for n, r in runs.items():
        out[n] = {}
        for st in pipeline_order():
            m = r.manifest(st) or {}
            if m.get("status") != "done":
                continue
            stat = os.stat(r.folder(st) / "manifest.json")
            out[n][st] = 0.0 if (stat.st_dev, stat.st_ino) in seen else m.get("seconds")
            seen.add((stat.st_dev, stat.st_ino))
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


def comparison_table(c: Comparison) -> str:
    """The text `wsss compare` prints."""
    lines = [f"runs: {', '.join(c.runs)}   baseline: {c.baseline}"]
    if c.differs:
        lines.append("what differs:")
        for key, values in c.differs.items():
            lines.append(f"  {key}: " + ", ".join(f"{n} {v}" for n, v in values.items()))
    lines.append(f"mIoU (%) with 95 % bootstrap intervals ({c.resamples} resamples of the images, seed {c.seed}); "
                 "differences from the baseline are paired; '~0' marks an interval that holds 0")
    for e in c.evaluations:
        lines.append(f"  {c.labels[e]}")
        for n in c.runs:
            m = c.miou[e][n]
            row = f"    {n:<28} {_pct(m.value)} [{_pct(m.low)}, {_pct(m.high)}]"
            if n in c.delta[e]:
                d = c.delta[e][n]
                row += f"   {100 * d.value:+5.1f} [{100 * d.low:+5.1f}, {100 * d.high:+5.1f}]" + \
                    ("  ~0" if d.holds_zero else "")
            lines.append(row)
    lines.append("time per stage (s; 0: shared with a run above):")
    stages = list(dict.fromkeys(st for n in c.runs for st in c.seconds[n]))
    for n in c.runs:
        lines.append(f"  {n:<28} " + ", ".join(f"{st} {c.seconds[n].get(st) or 0:.0f}" for st in stages))
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
