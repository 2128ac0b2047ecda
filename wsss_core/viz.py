"""Pictures for the notebooks: label colours, overlays, charts and grids."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .data.images import voc_palette


_PALETTE = voc_palette()


def colorize(labels: np.ndarray) -> np.ndarray:
    """Label map (HxW uint8) -> RGB image with the VOC colours."""
    return _PALETTE[np.asarray(labels, dtype=np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, void: int = 255) -> np.ndarray:
    """Blend label colours over an RGB image; background (0) and void stay unblended."""
    img = np.asarray(image, dtype=np.float32)
    col = colorize(labels).astype(np.float32)
    m = ((labels != 0) & (labels != void))[..., None]
    out = np.where(m, (1 - alpha) * img + alpha * col, img)
    return out.clip(0, 255).astype(np.uint8)


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heat map (e.g. a CAM) over an RGB image."""
    import matplotlib

    rgb = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255
    return ((1 - alpha) * np.asarray(image, np.float32) + alpha * rgb).clip(0, 255).astype(np.uint8)


def plot_class_counts(counts: Mapping[str, Mapping[str, int]], ax: Any = None, title: str = "") -> Any:
    """Grouped bar chart of images per class, one group of bars per split."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.5))
    splits = list(counts)
    classes = list(next(iter(counts.values())))
    x = np.arange(len(classes))
    width = 0.8 / max(len(splits), 1)
    for i, s in enumerate(splits):
        ax.bar(x + i * width, [counts[s][c] for c in classes], width, label=s)
    ax.set_xticks(x + width * (len(splits) - 1) / 2, classes, rotation=45, ha="right")
    ax.set_ylabel("images")
    ax.set_title(title or "images per class")
    ax.legend()
    return ax


def plot_cooccurrence(matrix: Sequence[Sequence[int]], classes: Sequence[str], ax: Any = None, title: str = "") -> Any:
    """Heat map of how often two classes are labelled in the same image."""
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="w" if m[i, j] < m.max() / 2 else "k")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "label co-occurrence (diagonal: images per class)")
    return ax


def show_grid(
    images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 4, size: float = 2.6
) -> Any:
    """Show images in a grid; returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k])
            if titles is not None:
                ax.set_title(titles[k], fontsize=8)
    fig.tight_layout()
    return fig


def legend_patches(classes: Sequence[str], present: Sequence[int] | None = None) -> list:
    """Matplotlib legend handles for class colours."""
    from matplotlib.patches import Patch

    ids = range(len(classes)) if present is None else present
    return [Patch(color=_PALETTE[k] / 255.0, label=classes[k]) for k in ids]


def mask_examples(masks: Any, classes: Sequence[str], n: int = 8, alpha: float = 0.55) -> Any:
    """Grid of the first `n` images of a MaskSet with their masks overlaid
    (evaluation data: masks are never used for training)."""
    ids = list(masks.ids)[:n]
    pictures, titles = [], []
    for i in ids:
        m = masks.mask(i)
        pictures.append(overlay(masks.image(i), m, alpha))
        present = [classes[k] for k in np.unique(m) if 0 < k < len(classes)]
        titles.append(f"{i}: {', '.join(present) or '-'}")
    return show_grid(pictures, titles)


def plot_history(history: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("val_map",)) -> Any:
    """Training loss, learning rate(s) and validation metrics per epoch."""
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    shown = [m for m in metrics if any(m in h for h in history)]
    fig, axes = plt.subplots(1, 2 + len(shown), figsize=(4.2 * (2 + len(shown)), 3.2), squeeze=False)
    ax = axes[0]
    ax[0].plot(epochs, [h["loss"] for h in history], marker="o")
    ax[0].set(title="training loss", xlabel="epoch")
    lrs = np.array([h["lr"] for h in history])
    for g in range(lrs.shape[1] if lrs.ndim == 2 else 0):
        ax[1].plot(epochs, lrs[:, g], marker="o", label=f"group {g}")
    ax[1].set(title="learning rate", xlabel="epoch", yscale="log")
    ax[1].legend(fontsize=7)
    for k, m in enumerate(shown):
        points = [(h["epoch"], h[m]) for h in history if m in h]  # epochs without an evaluation are left out
        ax[2 + k].plot(*zip(*points), marker="o", color="C2")
        ax[2 + k].set(title=m, xlabel="epoch")
    fig.tight_layout()
    return fig


def plot_per_class(values: Mapping[str, float | None], title: str, ax: Any = None, ylim: tuple = (0, 1)) -> Any:
    """Bar chart of one number per class (AP, IoU, ...), with the mean as a line."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(max(5, 0.5 * len(values)), 3.2))
    names = list(values)
    v = np.array([np.nan if values[n] is None else values[n] for n in names], dtype=float)
    ax.bar(range(len(names)), np.nan_to_num(v), color="C0")
    ax.axhline(np.nanmean(v), color="C3", ls="--", label=f"mean {np.nanmean(v):.3f}")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set(title=title, ylim=ylim)
    ax.legend(fontsize=8)
    return ax


def prediction_examples(images: Any, scores: np.ndarray, class_names: Sequence[str], n: int = 8,
                        threshold: float = 0.5) -> Any:
    """Grid of images titled with their labels and the classifier's top scores."""
    pictures, titles = [], []
    for i in range(min(n, len(images))):
        img, lab = images[i]
        top = np.argsort(-scores[i])[:3]
        truth = [class_names[k] for k in np.flatnonzero(np.asarray(lab) > 0.5) if k < len(class_names)]
        pred = ", ".join(f"{class_names[k]} {scores[i, k]:.2f}" for k in top if scores[i, k] >= threshold / 5)
        pictures.append(img)
        titles.append(f"label: {', '.join(truth) or '-'}\npred: {pred or '-'}")
    return show_grid(pictures, titles)


def plot_filter_scores(scores: np.ndarray, labelled: np.ndarray, dropped: np.ndarray, threshold: float) -> Any:
    """Histogram of the missing-label filter's scores for labelled and unlabelled
    images, with the drop line at P(present) = 1 - threshold."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ok = ~np.isnan(scores)
    bins = np.linspace(0, 1, 21)
    ax.hist(scores[ok & labelled], bins, alpha=0.6, label="class labelled")
    ax.hist(scores[ok & ~labelled], bins, alpha=0.6, label="not labelled")
    ax.axvline(1 - threshold, color="C3", ls="--", label=f"drop if unlabelled and > {1 - threshold:.2f}")
    ax.set(xlabel="filter score P(class present)", ylabel="images",
           title=f"missing-label filter: {int(dropped.sum())} of {int(ok.sum())} images dropped")
    ax.legend(fontsize=8)
    return fig


def plot_threshold_sweep(quality: Mapping[str, Any], ax: Any = None, title: str = "") -> Any:
    """CAM mIoU against the background threshold, best point marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    t, m = quality["thresholds"], quality["miou"]
    ax.plot(t, m, marker="o")
    b = quality["best_threshold"]
    ax.axvline(b, color="C3", ls="--", label=f"best {b:.2f}: mIoU {max(m):.3f}")
    ax.set(xlabel="background threshold", ylabel="mIoU", title=title or "CAM quality vs background threshold")
    ax.legend(fontsize=8)
    return ax


def cam_gallery(rows: Sequence[Mapping[str, Any]], n_cols_max: int = 6, size: float = 2.4) -> Any:
    """Rows of [image, CAM per class ...]; each row is
    {"title", "image", "maps": [(label, HxW map in [0,1]), ...]}."""
    import matplotlib.pyplot as plt

    ncols = min(n_cols_max, 1 + max((len(r["maps"]) for r in rows), default=0))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(size * ncols, size * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row["image"])
        axes[r, 0].set_title(row["title"], fontsize=8)
        for c, (label, heat) in enumerate(row["maps"][: ncols - 1], 1):
            axes[r, c].imshow(heat_overlay(row["image"], heat, 0.5))
            axes[r, c].set_title(label, fontsize=8)
        for a in axes[r]:
            a.axis("off")
    fig.tight_layout()
    return fig


def plot_intervals(c: Any, evaluation: str, ax: Any = None) -> Any:
    """mIoU of each row with its 95 % interval (`compare.Comparison`: the mean over seeds, two-level) and,
    beside it, a strip of each seed's own figure; rows whose difference from the baseline holds 0 are drawn
    hollow, rows of one seed (interval over images only) with a dashed bar."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(c.runs) + 2), 3.2))
    for k, n in enumerate(c.runs):
        m = c.miou[evaluation][n]
        same = n in c.delta[evaluation] and c.delta[evaluation][n].holds_zero
        color = "C0" if n != c.baseline else "C3"
        bar = ax.errorbar([k], [100 * m.value], yerr=[[100 * (m.value - m.low)], [100 * (m.high - m.value)]],
                          fmt="o", color=color, mfc="white" if same else None, capsize=4)
        if m.images_only:
            bar[2][0].set_linestyle("--")
        if len(m.seeds) > 1:
            ax.plot(k + 0.2 + np.linspace(-0.05, 0.05, len(m.seeds)), 100 * np.asarray(m.seeds), "x", color=color,
                    alpha=0.7, ms=5)
    ax.set_xticks(range(len(c.runs)), [f"{n} ({c.n_seeds(n)} seed{'s' if c.n_seeds(n) > 1 else ''})"
                                       for n in c.runs], rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="mIoU (%)", title=f"{c.labels[evaluation]}: mean and 95 % interval over seeds and images, x: each "
                                     "seed (baseline red; hollow: no real difference; dashed: one seed)")
    ax.title.set_fontsize(9)
    return ax.figure


def plot_class_deltas(c: Any, evaluation: str, ax: Any = None) -> Any:
    """Per-class IoU difference from the baseline (points), run by run, as a heat map."""
    import matplotlib.pyplot as plt

    others = [n for n in c.runs if n != c.baseline]
    m = np.array([[np.nan if c.class_delta[evaluation][n][cl] is None else 100 * c.class_delta[evaluation][n][cl]
                   for n in others] for cl in c.classes])
    if ax is None:
        _, ax = plt.subplots(figsize=(0.9 * len(others) + 3, 0.32 * len(c.classes) + 1.5))
    lim = max(1.0, float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0)
    im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(others)), others, rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(len(c.classes)), c.classes, fontsize=8)
    for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"IoU per class minus {c.baseline} (points)", fontsize=9)
    plt.colorbar(im, ax=ax, fraction=0.046)
    return ax.figure


_SECOND_HALF_TITLES = {"image": "image", "cam": "CAM (stride 4, max)", "confident_labels": "confident labels",
                       "boundary": "boundary", "walk": "random walk (max)", "walk_mask": "walk's mask",
                       "pseudo_mask": "pseudo mask",
                       "ground_truth": "ground truth"}


def second_half_panels(maps: Mapping[str, np.ndarray], without: Sequence[str] = ()) -> list[tuple[str, np.ndarray]]:
    """(title, map) panels of `stages.pseudo_masks.second_half_maps`, in the method's order."""
    return [(title, maps[k]) for k, title in _SECOND_HALF_TITLES.items() if k in maps and k not in without]


def label_panels(panels: Sequence[tuple[str, np.ndarray]], size: float = 2.6) -> Any:
    """One row of pictures: RGB images shown as they are, label maps coloured."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for a, (title, arr) in zip(axes[0], panels):
        if arr.ndim == 2 and arr.dtype.kind == "f":  # a map in [0, 1] (boundary, scores)
            a.imshow(arr, cmap="magma", vmin=0.0, vmax=1.0)
        else:
            a.imshow(arr if arr.ndim == 3 else colorize(arr))
        a.set_title(title, fontsize=8)
        a.axis("off")
    fig.tight_layout()
    return fig


def plot_precision_coverage(points: Sequence[Mapping[str, float]], current: tuple[float, float] | None = None) -> Any:
    """Confident-label precision against coverage as the CRF thresholds move."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for p in points:
        here = current is not None and (p["conf_fg_thres"], p["conf_bg_thres"]) == current
        ax.scatter(p["coverage"], p["precision"], color="C3" if here else "C0", s=40 if here else 20)
        ax.annotate(f"{p['conf_fg_thres']:.2f}/{p['conf_bg_thres']:.2f}", (p["coverage"], p["precision"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="coverage (share of pixels not 255)", ylabel="precision of confident pixels",
           title="confident labels: fg/bg thresholds (red: current)")
    return fig


def plot_stage_ious(per_stage: Mapping[str, Mapping[str, float | None]], title: str = "IoU per class",
                    ax: Any = None) -> Any:
    """Grouped bars: per class, the IoU of each stage (e.g. CAM, confident
    labels, pseudo masks, predictions), with each stage's mIoU in the legend."""
    import matplotlib.pyplot as plt

    stages = list(per_stage)
    classes = list(next(iter(per_stage.values())))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(7, 0.7 * len(classes)), 3.6))
    width = 0.8 / max(len(stages), 1)
    x = np.arange(len(classes))
    for i, st in enumerate(stages):
        v = np.array([np.nan if per_stage[st].get(c) is None else per_stage[st][c] for c in classes], float)
        ax.bar(x + i * width, np.nan_to_num(v), width, label=f"{st} (mIoU {np.nanmean(v):.3f})")
    ax.set_xticks(x + width * (len(stages) - 1) / 2, classes, rotation=45, ha="right")
    ax.set(ylim=(0, 1), ylabel="IoU", title=title)
    ax.legend(fontsize=7)
    return ax


def plot_boundary_pr(scores: Mapping[str, Any], ax: Any = None) -> Any:
    """Boundary precision and recall against the threshold, best F marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    t = scores["thresholds"]
    ax.plot(t, scores["precision"], marker="o", label="precision")
    ax.plot(t, scores["recall"], marker="o", label="recall")
    ax.plot(t, scores["f"], marker="o", label="F")
    ax.axvline(scores["best_threshold"], color="C3", ls="--", label=f"best F {scores['best_f']:.3f}")
    ax.set(xlabel="boundary threshold", ylim=(0, 1), title="boundaries vs mask edges (val)")
    ax.legend(fontsize=8)
    return ax


def plot_sweep(points: Sequence[Mapping[str, float]], x: str, series: str, y: str = "miou",
               current: tuple[float, float] | None = None, ax: Any = None) -> Any:
    """One line of `y` against `x` per value of `series` (e.g. mIoU against the
    background threshold, one line per beta); the current setting marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.4))
    for value in sorted({p[series] for p in points}):
        pts = sorted((p[x], p[y]) for p in points if p[series] == value)
        ax.plot(*zip(*pts), marker="o", label=f"{series} {value:g}")
    if current is not None:
        ax.scatter([current[0]], [next((p[y] for p in points if (p[x], p[series]) == current), np.nan)],
                   s=120, facecolors="none", edgecolors="C3", label="current")
    ax.set(xlabel=x, ylabel=y)
    ax.legend(fontsize=8)
    return ax


def iou_table(series: Mapping[str, Mapping[str, float | None]]) -> str:
    """Per-class IoU of several models as a text table (one column per model)."""
    names = list(series)
    classes = list(next(iter(series.values())))
    head = f"{'class':<14}" + "".join(f"{n:>22}" for n in names)
    rows = [f"{c:<14}" + "".join(f"{'-' if series[n].get(c) is None else f'{series[n][c]:.3f}':>22}" for n in names)
            for c in classes]
    return "\n".join([head, *rows])


def plot_timings(seconds: Mapping[str, float | None], ax: Any = None) -> Any:
    """Minutes per stage, in pipeline order."""
    import matplotlib.pyplot as plt

    t = {k: v for k, v in seconds.items() if v}
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.35 * len(t) + 1))
    ax.barh(list(t), [v / 60 for v in t.values()])
    ax.set(xlabel="minutes", title=f"time per stage (total {sum(t.values()) / 60:.1f} min)")
    ax.invert_yaxis()
    return ax


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], ax: Any = None, title: str = "") -> Any:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction)."""
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=float)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * len(classes) + 2, 0.45 * len(classes) + 1.5))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="ground truth", title=title or "confusion (share of each true class)")
    plt.colorbar(im, ax=ax, fraction=0.046)
    return ax


def plot_lift(miou: Mapping[str, float], ax: Any = None, title: str = "mIoU from stage to stage") -> Any:
    """mIoU of each stage in pipeline order: how much each step adds."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(1.5 * len(miou) + 2, 3.4))
    miou = {k: v for k, v in miou.items() if v is not None}
    names, values = list(miou), [100 * v for v in miou.values()]
    bars = ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set(ylabel="mIoU (%)", ylim=(0, 100), title=title)
    return ax


def show_config(summary: Mapping[str, Any]) -> Any:
    """The parameters that differ from the defaults as a table, the whole
    configuration folded below it (`stages.report.config_summary`)."""
    import html

    from IPython.display import HTML, display

    rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td><code>{html.escape(str(v))}</code></td></tr>"
                   for k, v in summary["changed"].items())
    table = (f"<table><tr><th>parameter</th><th>value</th></tr>{rows}</table>" if rows
             else "<p>Every parameter has its default value.</p>")
    return display(HTML(f"<p>Parameters that differ from the defaults:</p>{table}<details><summary>the whole "
                        f"configuration</summary><pre>{html.escape(summary['all'])}</pre></details>"))


RECORD_MIME = "application/vnd.wsss.record+json"  # a notebook's recorded values, in its outputs


def record(**values: Any) -> None:
    """Keep values the notebook shows in its output as data (plain JSON values), so tests and tools read
    them back from the executed notebook as values (`recorded`), not by parsing printed text."""
    from IPython.display import display

    display({RECORD_MIME: values, "text/plain": ""}, raw=True)


def recorded(notebook: Any) -> dict[str, Any]:
    """Every value an executed notebook recorded (`record`), later records overriding earlier ones."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4) if not hasattr(notebook, "cells") else notebook
    out: dict[str, Any] = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            out.update(o.get("data", {}).get(RECORD_MIME, {}))
    return out


_SELF_CONTAINED = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def notebook_html(notebook: Any) -> str:
    """An executed notebook as one self-contained HTML page for reading offline:
    code hidden, pictures embedded, no script loaded from the network, and the
    stages' own log lines (`[wsss] 08_report: already done ...`: a notebook `wsss run`
    executes finds its stages done) left out."""
    import copy

    import jinja2
    import nbconvert
    import nbformat

    nb = copy.deepcopy(nbformat.read(notebook, as_version=4) if not hasattr(notebook, "cells") else notebook)
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if out.get("output_type") == "stream":
                text = out["text"] if isinstance(out["text"], str) else "".join(out["text"])
                out["text"] = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("[wsss]"))
        cell["outputs"] = [o for o in cell.get("outputs", []) if o.get("output_type") != "stream" or o["text"]]
    exporter = nbconvert.HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True, embed_images=True,
        extra_loaders=[jinja2.DictLoader({"wsss_offline.html.j2": _SELF_CONTAINED})],
        template_file="wsss_offline.html.j2")
    body, _ = exporter.from_notebook_node(nb)
    return body
