"""The CAM inspector: pick image, class, method, scales, background threshold,
overlay alpha and CRF on/off, and see the maps at once.

Maps are computed once per (image, method, scales, flip) and cached, so the
sliders only redo the cheap parts (threshold, blend, CRF). The callbacks are
plain functions of the widget values (`CamInspector.render`), tested headless.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .config import Config
from .evaluate import labels_from_cams
from .store import Run
from .viz import heat_overlay, overlay

SCALE_CHOICES: dict[str, tuple[float, ...]] = {
    "1.0": (1.0,),
    "1.0, 0.5": (1.0, 0.5),
    "1.0, 0.5, 1.5": (1.0, 0.5, 1.5),
    "1.0, 0.5, 0.75, 2.0": (1.0, 0.5, 0.75, 2.0),
}


@dataclass
class Rendered:
    """What the inspector shows for one setting of the controls."""

    image: np.ndarray  # HxWx3 uint8
    cam: np.ndarray  # HxW float32 in [0, 1], the chosen class
    cam_overlay: np.ndarray  # HxWx3 uint8
    labels: np.ndarray  # HxW uint8 class ids (after CRF when on)
    labels_overlay: np.ndarray  # HxWx3 uint8
    keys: np.ndarray  # class ids that have a map


class CamInspector:
    """Interactive CAM viewer over a run's classifier and dataset split."""

    def __init__(self, cfg: Config, run: Run, split: str | None = None, cache_size: int = 64,
                 device: str | None = None):
        from .artifacts import model_path
        from .data import open_dataset
        from .multilabel import load_classifier
        from .runtime import resolve_device

        from .store import StaleUpstreamError

        reason = run.why_not_done("classifier")
        if reason:
            raise StaleUpstreamError(f"the CAM inspector needs a trained classifier: {reason}. "
                                     "Run the classifier stage first (wsss run --to classifier).")
        self.cfg = cfg
        self.run = run
        self.device = resolve_device(device or cfg.device)
        self.trained = load_classifier(model_path(run, "classifier"), self.device)
        self.cam_model = self.trained.model.cam_model(cfg.cams.layer, cfg.cams.head)
        self.ds = open_dataset(cfg.data, validate=False)
        self.split = split or cfg.cams.split
        self.images = self.ds.labelled(self.split)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self.cache_size = cache_size
        self.computed = 0  # how many times maps were actually computed (for tests)
        self.last: Rendered | None = None  # what the widget drew last

    @property
    def ids(self) -> list[str]:
        return list(self.images.ids)

    def labelled_ids(self, n: int, ids: Sequence[str] | None = None) -> list[str]:
        """The first `n` images (of `ids`; default: every image here) with a labelled class the model knows."""
        return [i for i in (self.ids if ids is None else ids) if self.labelled_class_names(i)][:n]

    def labelled_class_names(self, image_id: str) -> list[str]:
        """The image's labelled classes that the model knows."""
        labels = self.images.labels[self.images.position(image_id)]
        return [self.ds.classes[k] for k in self.trained.class_ids if labels[k - 1] > 0.5]

    def class_names(self, image_id: str) -> list[str]:
        """Classes offered for an image: its labels first, then every class the model knows."""
        labelled = self.labelled_class_names(image_id)
        return labelled + [self.ds.classes[k] for k in self.trained.class_ids if self.ds.classes[k] not in labelled]

    def maps(self, image_id: str, method: str, scales: Sequence[float], flip: bool = True):
        """CAMs of every class the model knows for one image (cached)."""
        from .cam import class_activation_maps
        from .data.transforms import to_normalized_tensor

        key = (image_id, method, tuple(scales), flip)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image, _ = self.images[self.images.position(image_id)]
        mean, std = self.trained.meta["normalization"]
        x = to_normalized_tensor(image, mean, std).to(self.device)
        res = class_activation_maps(self.cam_model, x, self.trained.class_ids, scales=tuple(scales), flip=flip,
                                    method=method, normalize=self.cfg.cams.normalize,
                                    head_class_ids=self.trained.class_ids)
        self.computed += 1
        self._cache[key] = res
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return res

    def gallery(self, ids: Sequence[str], methods: Sequence[str], scales: Sequence[float]) -> list[dict]:
        """Rows for `viz.cam_gallery`: per image and method, the CAMs of its labelled classes."""
        rows = []
        for image_id in ids:
            image, labels = self.images[self.images.position(image_id)]
            for method in methods:
                res = self.maps(image_id, method, scales)
                maps = [(self.ds.classes[k], res.high_res[j]) for j, k in enumerate(res.keys) if labels[k - 1] > 0.5]
                rows.append({"title": f"{image_id} ({method})", "image": image, "maps": maps})
        return rows

    def run_settings(self) -> dict[str, Any]:
        """The CAM settings the inspector opens on: the run's own method, scales
        and flip, and the background threshold its cams stage found best on the
        masks; `threshold_from` says where the threshold came from (the middle
        of the swept thresholds when the cams stage has not run or its split
        has no masks)."""
        from .artifacts import read_result
        from .stages.cams import CamsResult

        cams = self.cfg.cams
        settings = {"method": cams.method, "scales": tuple(cams.scales), "flip": cams.flip,
                    "bg_threshold": cams.bg_thresholds[len(cams.bg_thresholds) // 2],
                    "threshold_from": "the middle of cams.bg_thresholds (the cams stage has not run)"}
        if self.run.is_done("cams"):
            best = read_result(self.run, "cams", CamsResult).best_threshold
            if best is None:
                settings["threshold_from"] = "the middle of cams.bg_thresholds (no masks to choose one on)"
            else:
                settings.update(bg_threshold=float(best), threshold_from="the best on the masks (cams stage)")
        return settings

    def scale_choices(self) -> list[tuple[str, tuple[float, ...]]]:
        """(label, scales) options of the scales dropdown; the run's scales are
        among them, labelled "(this run)"."""
        mine = tuple(self.cfg.cams.scales)
        choices = [(f"{label} (this run)" if sc == mine else label, sc) for label, sc in SCALE_CHOICES.items()]
        if mine not in SCALE_CHOICES.values():
            choices.insert(0, (", ".join(str(s) for s in mine) + " (this run)", mine))
        return choices

    def render(self, image_id: str, class_name: str, method: str = "gradcam", scales: Sequence[float] = (1.0,),
               bg_threshold: float = 0.15, alpha: float = 0.5, crf: bool = False,
               labelled_only: bool = True, flip: bool = True) -> Rendered:
        """Everything the inspector draws for one setting of the controls."""
        res = self.maps(image_id, method, scales, flip)
        image, labels = self.images[self.images.position(image_id)]
        k = self.ds.classes.index(class_name)
        keys = np.asarray(res.keys)
        j = int(np.flatnonzero(keys == k)[0])
        cam = res.high_res[j].astype(np.float32)
        use = [i for i, c in enumerate(keys) if not labelled_only or labels[c - 1] > 0.5] or [j]
        lab = labels_from_cams(res.high_res[use], keys[use], bg_threshold)
        if crf:
            lab = crf_refine(image, lab, self.cfg)
        return Rendered(image, cam, heat_overlay(image, cam, alpha), lab, overlay(image, lab, alpha), keys)

    def second_half(self, image_id: str) -> list[tuple[str, np.ndarray]] | None:
        """The method's second half for one image, from the run's stored outputs:
        CAM, confident labels, boundary map, random-walk scores, pseudo mask
        (and ground truth). None when the pseudo_masks stage has not made it."""
        from .artifacts import PSEUDO_MASKS

        if self.run.why_not_done("pseudo_masks") or not PSEUDO_MASKS.exists(self.run, image_id):
            return None
        key = ("second half", image_id)
        if key not in self._cache:
            from .stages.pseudo_masks import second_half_maps
            from .viz import second_half_panels

            self._cache[key] = second_half_panels(second_half_maps(self.cfg, self.run, image_id), without=("image",))
        return self._cache[key]

    def widget(self) -> Any:
        """The ipywidgets panel (JupyterLab)."""
        import ipywidgets as w

        run = self.run_settings()  # open on the run's own CAM settings
        image = w.Dropdown(options=self.ids, description="image")
        cls = w.Dropdown(options=self.class_names(self.ids[0]), description="class")
        method = w.ToggleButtons(options=[("Grad-CAM", "gradcam"), ("Grad-CAM++", "gradcam++"),
                                          ("Grad-CAM++ (seed)", "gradcam++exp")],
                                 value=run["method"], description="method")
        scales = w.Dropdown(options=self.scale_choices(), value=run["scales"], description="scales")
        thr = w.FloatSlider(value=run["bg_threshold"], min=0.0, max=1.0, step=0.01, description="bg thresh")
        alpha = w.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="alpha")
        crf = w.Checkbox(value=False, description="dense CRF")
        out = w.Output()
        second = w.Output()

        def draw_second(image_id: str) -> None:
            from .viz import label_panels

            import matplotlib.pyplot as plt

            panels = self.second_half(image_id)
            second.clear_output(wait=True)
            with second:
                if panels is None:
                    print("second half: not available for this image (pseudo_masks stage not run, or image not kept)")
                else:
                    label_panels(panels, size=2.3)
                    plt.show()

        def draw(*_):
            r = self.last = self.render(image.value, cls.value, method.value, scales.value,
                                        thr.value, alpha.value, crf.value, flip=run["flip"])
            out.clear_output(wait=True)
            with out:
                show_rendered(r, f"{image.value} / {cls.value} / {method.value}")

        def new_image(change):
            cls.options = self.class_names(change["new"])
            draw()
            draw_second(change["new"])

        image.observe(new_image, names="value")
        for c in (cls, method, scales, thr, alpha, crf):
            c.observe(draw, names="value")
        draw()
        draw_second(image.value)
        panel = w.VBox([w.HBox([image, cls, scales]), method, w.HBox([thr, alpha, crf]), out, second])
        panel.controls = {"image": image, "class": cls, "method": method, "scales": scales,  # type: ignore[attr-defined]
                          "bg_threshold": thr, "alpha": alpha, "crf": crf}
        return panel


def crf_refine(image: np.ndarray, labels: np.ndarray, cfg: Config) -> np.ndarray:
    """Dense-CRF refinement of a class-id label map (ids kept as they are)."""
    from .crf import dense_crf_labels

    ids = np.unique(labels)
    if len(ids) <= 1:
        return labels.copy()
    lut = np.zeros(256, np.int64)
    lut[ids] = np.arange(len(ids))
    refined = dense_crf_labels(image, lut[labels], len(ids), cfg.crf)
    return ids[refined].astype(np.uint8)


def show_rendered(r: Rendered, title: str = "") -> Any:
    import matplotlib.pyplot as plt

    from .viz import colorize

    fig, ax = plt.subplots(1, 4, figsize=(14, 3.6))
    for a, img, t in zip(ax, [r.image, r.cam_overlay, colorize(r.labels), r.labels_overlay],
                         ["image", "CAM", "labels", "labels overlay"]):
        a.imshow(img)
        a.set_title(t, fontsize=9)
        a.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.show()
    return fig
