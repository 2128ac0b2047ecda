"""The embedded demo dataset, generated deterministically from a seed and
written in VOC layout (so the VOC reader reads it back).

Images show 1..max_objects textured objects of six classes on textured
backgrounds; later objects occlude earlier ones and the masks hold only the
visible pixels. Classes are sampled with weights falling ~4x from the most to
the least frequent one. On a share of the train images that contain a person
(outside a trusted subset) the "person" label is left out of the image-level
labels, as in real data where people are often not tagged; `meta.json`
records which, to evaluate the missing-label filter later.

Drawing is vectorised numpy on each object's bounding window; all randomness
comes from numpy Generators seeded by (seed, split, image index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .images import voc_palette

from ..config import SyntheticConfig, cache_root
from .errors import DataError
from .voc import IMAGE_DIR, LIST_DIR, MASK_DIR

GENERATOR_VERSION = 1
SYNTHETIC_CLASSES = ("background", "person", "disc", "square", "triangle", "star", "ring")
PERSON = SYNTHETIC_CLASSES.index("person")
# Sampling weight per class id (0 = background, never sampled): 4x from disc to ring.
CLASS_WEIGHTS = np.array([0.0, 3.0, 4.0, 2.4, 1.7, 1.3, 1.0])
SPLITS = ("train", "val")
JPEG_QUALITY = 95
_PLACEMENT_TRIES = 12
_KEEP_VISIBLE = 0.45  # an earlier object must keep this share of its area visible

Array = np.ndarray


# --------------------------------------------------------------------------- cache
def synthetic_hash(cfg: SyntheticConfig) -> str:
    """Stable hash of the generation parameters (not the cache folder) and generator version."""
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    blob = json.dumps({"params": params, "generator": GENERATOR_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def synthetic_dir(cfg: SyntheticConfig) -> Path:
    """Where the dataset of these parameters lives: <cache>/synthetic/<hash>."""
    return cache_root(cfg.cache_dir) / "synthetic" / synthetic_hash(cfg)


def ensure_synthetic(cfg: SyntheticConfig) -> Path:
    """The cached dataset folder, generated first if it is not there yet."""
    return generate_synthetic(cfg, synthetic_dir(cfg))


def generate_synthetic(cfg: SyntheticConfig, out_dir: str | Path) -> Path:
    """Write the dataset of `cfg` to `out_dir` (reused if already complete).

    Generation goes to a temporary sibling folder renamed into place at the
    end, so readers never see a half-written dataset; if another process
    finished first, its copy is kept and ours discarded.
    """
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_dataset(cfg, tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "meta.json").is_file():
                raise DataError(f"{out_dir}: exists but is not a complete synthetic dataset "
                                "(no meta.json); remove it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- writing
def _write_dataset(cfg: SyntheticConfig, folder: Path) -> None:
    """Render every image and write the VOC-layout files, meta.json last."""
    for sub in (IMAGE_DIR, MASK_DIR, str(LIST_DIR)):
        (folder / sub).mkdir(parents=True)
    palette = voc_palette().reshape(-1).tolist()
    present: dict[str, dict[str, list[int]]] = {}
    objects: dict[str, int] = {}
    for si, split in enumerate(SPLITS):
        n = cfg.n_train if split == "train" else cfg.n_val
        present[split] = {}
        for i in range(n):
            sid = f"{split}_{i:04d}"
            rng = np.random.default_rng([_seed_word(cfg.seed), si, i])
            image, mask, objects[sid] = render_image(rng, cfg.image_size, cfg.max_objects)
            Image.fromarray(image).save(folder / IMAGE_DIR / f"{sid}.jpg", quality=JPEG_QUALITY)
            _save_mask(mask, folder / MASK_DIR / f"{sid}.png", palette)
            present[split][sid] = [int(k) for k in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1:]) + 1]
        _write_lines(folder / LIST_DIR / f"{split}.txt", list(present[split]))
    trusted, dropped = missing_person_labels(cfg, present["train"])
    _write_labels(folder / "image_labels_train.csv", present["train"], set(dropped))
    _write_labels(folder / "image_labels_val.csv", present["val"], set())
    _write_lines(folder / "trusted_train.txt", trusted)
    _write_lines(folder / "classes.txt", list(SYNTHETIC_CLASSES))
    (folder / "README.txt").write_text(_readme(cfg, len(trusted), len(dropped)))
    meta = {
        "generator_version": GENERATOR_VERSION,
        "params": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"},
        "classes": list(SYNTHETIC_CLASSES),
        "class_weights": dict(zip(SYNTHETIC_CLASSES[1:], CLASS_WEIGHTS[1:].tolist())),
        "person_dropped": dropped,
        "trusted": trusted,
        "objects": objects,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _seed_word(seed: int) -> int:
    """numpy seeds must be non-negative: fold any int into 64 bits."""
    return seed % (1 << 64)


def missing_person_labels(cfg: SyntheticConfig, train: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """(trusted ids, ids whose person label is dropped), both in id order.

    `trusted_fraction` of the train images form the trusted subset; among the
    other images showing a person, a `person_label_drop` share loses the label.
    """
    rng = np.random.default_rng([_seed_word(cfg.seed), len(SPLITS)])
    ids = list(train)
    chosen = set(rng.permutation(len(ids))[: round(cfg.trusted_fraction * len(ids))].tolist())
    trusted = [sid for j, sid in enumerate(ids) if j in chosen]
    eligible = [sid for j, sid in enumerate(ids) if j not in chosen and PERSON in train[sid]]
    picked = set(rng.permutation(len(eligible))[: round(cfg.person_label_drop * len(eligible))].tolist())
    dropped = [sid for j, sid in enumerate(eligible) if j in picked]
    return trusted, dropped


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def _write_labels(path: Path, present: dict[str, list[int]], drop_person: set[str]) -> None:
    rows = ["image_id,labels"]
    for sid, ks in present.items():
        names = [SYNTHETIC_CLASSES[k] for k in ks if not (k == PERSON and sid in drop_person)]
        rows.append(f"{sid},{' '.join(names)}")
    _write_lines(path, rows)


def _save_mask(mask: Array, path: Path, palette: list[int]) -> None:
    im = Image.fromarray(mask)
    im.putpalette(palette)
    im.save(path, optimize=False)


def _readme(cfg: SyntheticConfig, n_trusted: int, n_dropped: int) -> str:
    params = "\n".join(f"  {k}: {v}" for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir")
    weights = ", ".join(f"{n} {w:g}" for n, w in zip(SYNTHETIC_CLASSES[1:], CLASS_WEIGHTS[1:]))
    return (
        "Synthetic demo dataset for weakly supervised segmentation (generated, do not edit).\n"
        f"Generator version {GENERATOR_VERSION}; parameters:\n{params}\n"
        f"Classes (index = mask value, 255 void): {', '.join(SYNTHETIC_CLASSES)}\n"
        f"Class sampling weights: {weights}\n"
        f"Trusted train images (labels complete): {n_trusted} (trusted_train.txt)\n"
        f"Train images whose 'person' label was dropped from image_labels_train.csv: {n_dropped} "
        "(listed in meta.json; the masks still show them, masks are for evaluation only)\n"
    )


# --------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class _Object:
    cls: int
    cx: float
    cy: float
    sx: float  # half-size along the object's u axis, pixels
    sy: float  # half-size along v
    theta: float  # rotation, radians


def render_image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[Array, Array, int]:
    """(RGB uint8 image, uint8 class mask of visible pixels, number of objects drawn)."""
    image = _background(rng, size)
    inst = np.full((size, size), -1, np.int16)
    placed: list[_Placed] = []
    min_px = max(12, int(0.004 * size * size))
    for n in range(int(rng.integers(1, max_objects + 1))):
        tries = _PLACEMENT_TRIES if placed or n else 10 * _PLACEMENT_TRIES
        _place_object(rng, size, image, inst, placed, min_px, tries)
    lut = np.array([p.cls for p in placed] + [0], np.uint8)  # index -1 -> background
    mask = lut[inst]
    image += 3.0 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, len(placed)


@dataclass
class _Placed:
    cls: int
    area: int
    visible: int


def _place_object(
    rng: np.random.Generator, size: int, image: Array, inst: Array, placed: list[_Placed], min_px: int, tries: int
) -> bool:
    """Draw one object on top, retrying new poses until it is big enough and
    leaves every earlier object at least _KEEP_VISIBLE of its area visible."""
    for _ in range(tries):
        obj = _sample_object(rng, size)
        win, u, v = _frame(obj, size)
        inside = SHAPES[obj.cls](u, v)
        under = inst[win][inside]
        if under.size < min_px or not _occlusion_ok(under, placed, min_px):
            continue
        colours = TEXTURES[obj.cls](u, v, rng) * _shading(u, v, rng)[..., None]
        image[win][inside] = colours[inside]
        inst[win][inside] = len(placed)
        lost = np.bincount(under[under >= 0], minlength=len(placed))
        for p, n_lost in zip(placed, lost):
            p.visible -= int(n_lost)
        placed.append(_Placed(obj.cls, int(under.size), int(under.size)))
        return True
    return False


def _occlusion_ok(under: Array, placed: list[_Placed], min_px: int) -> bool:
    if not placed:
        return True
    lost = np.bincount(under[under >= 0], minlength=len(placed))
    return all(p.visible - n >= max(min_px, _KEEP_VISIBLE * p.area) for p, n in zip(placed, lost))


def _sample_object(rng: np.random.Generator, size: int) -> _Object:
    """Class by the imbalanced weights; position, size, aspect and rotation at random."""
    cls = int(rng.choice(len(CLASS_WEIGHTS), p=CLASS_WEIGHTS / CLASS_WEIGHTS.sum()))
    cx, cy = rng.uniform(0.12 * size, 0.88 * size, 2)
    if cls == PERSON:  # upright, taller than wide
        r = rng.uniform(0.17, 0.32) * size
        return _Object(cls, cx, cy, r * rng.uniform(0.85, 1.1), r, rng.uniform(-0.3, 0.3))
    r = rng.uniform(0.1, 0.24) * size
    aspect = math.sqrt(rng.uniform(0.65, 1.5))
    return _Object(cls, cx, cy, r * aspect, r / aspect, rng.uniform(0.0, 2 * math.pi))


def _frame(obj: _Object, size: int) -> tuple[tuple[slice, slice], Array, Array]:
    """The object's bounding window in the image and the object-frame
    coordinates (u, v) of its pixels (shapes live in [-1, 1]^2)."""
    reach = 1.45 * max(obj.sx, obj.sy)
    y0, y1 = max(0, int(obj.cy - reach)), min(size, int(math.ceil(obj.cy + reach)) + 1)
    x0, x1 = max(0, int(obj.cx - reach)), min(size, int(math.ceil(obj.cx + reach)) + 1)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - obj.cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - obj.cx
    c, s = math.cos(obj.theta), math.sin(obj.theta)
    u = (c * dx + s * dy) / obj.sx
    v = (-s * dx + c * dy) / obj.sy
    return (slice(y0, y1), slice(x0, x1)), u, v


# --------------------------------------------------------------------------- shapes
def _person(u: Array, v: Array) -> Array:
    """Head disc on a rounded torso with arms and two legs."""
    head = u**2 + (v + 0.74) ** 2 <= 0.24**2
    torso = (u / 0.3) ** 4 + ((v + 0.08) / 0.44) ** 4 <= 1.0
    arms = (np.abs(u) >= 0.33) & (np.abs(u) <= 0.44) & (v >= -0.42) & (v <= 0.12)
    legs = (np.abs(u) >= 0.04) & (np.abs(u) <= 0.24) & (v >= 0.2) & (v <= 1.0)
    return head | torso | arms | legs


def _disc(u: Array, v: Array) -> Array:
    return u**2 + v**2 <= 1.0


def _square(u: Array, v: Array) -> Array:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _triangle(u: Array, v: Array) -> Array:
    return (v <= 0.65) & (np.abs(u) <= (v + 1.0) * (0.95 / 1.65))


def _star(u: Array, v: Array) -> Array:
    t = (np.arctan2(v, u) * (5 / (2 * math.pi))) % 1.0
    return np.hypot(u, v) <= 0.42 + 0.58 * np.abs(2 * t - 1)


def _ring(u: Array, v: Array) -> Array:
    r2 = u**2 + v**2
    return (r2 <= 1.0) & (r2 >= 0.55**2)


# --------------------------------------------------------------------------- textures
def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], sd: float = 14.0) -> Array:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, sd, 3).astype(np.float32), 0, 255)


def _pick(sel: Array, a: Array, b: Array) -> Array:
    return np.where(sel[..., None], a, b).astype(np.float32)


def _mix(t: Array, a: Array, b: Array) -> Array:
    t = np.clip(t, 0.0, 1.0)[..., None]
    return (a * (1 - t) + b * t).astype(np.float32)


def _tex_person(u: Array, v: Array, rng: np.random.Generator) -> Array:
    """Skin-toned head, a shirt of any colour (torso and arms), darker trousers (legs)."""
    skins = ((224, 172, 140), (198, 134, 100), (141, 85, 54), (250, 214, 170))
    skin = _jitter(rng, skins[int(rng.integers(len(skins)))], 8)
    shirt = rng.uniform(30, 230, 3).astype(np.float32)
    trousers = rng.uniform(15, 95, 3).astype(np.float32)
    out = _pick(v >= 0.2, trousers, shirt)
    return np.where((v < -0.5)[..., None], skin, out).astype(np.float32)


def _tex_disc(u: Array, v: Array, rng: np.random.Generator) -> Array:
    """Red / yellow stripes."""
    f, ph = rng.uniform(2.0, 4.0), rng.uniform(0, 2 * math.pi)
    return _pick(np.sin(2 * math.pi * f * u + ph) > 0, _jitter(rng, (205, 45, 45)), _jitter(rng, (245, 205, 60)))


def _tex_square(u: Array, v: Array, rng: np.random.Generator) -> Array:
    """Blue / white checkerboard."""
    k = rng.uniform(1.5, 3.0)
    sel = (np.floor(u * k) + np.floor(v * k)) % 2 == 0
    return _pick(sel, _jitter(rng, (40, 75, 205)), _jitter(rng, (225, 230, 240)))


def _tex_triangle(u: Array, v: Array, rng: np.random.Generator) -> Array:
    """Dark dots on green."""
    k = rng.uniform(2.5, 4.0)
    fu, fv = (u * k) % 1.0 - 0.5, (v * k) % 1.0 - 0.5
    return _pick(fu**2 + fv**2 < 0.3**2, _jitter(rng, (20, 70, 35)), _jitter(rng, (70, 175, 80)))


def _tex_star(u: Array, v: Array, rng: np.random.Generator) -> Array:
    """Orange centre fading radially to purple."""
    return _mix(np.hypot(u, v), _jitter(rng, (250, 165, 30)), _jitter(rng, (140, 45, 165)))


def _tex_ring(u: Array, v: Array, rng: np.random.Generator) -> Array:
    """Cyan / magenta varying smoothly around the ring."""
    t = 0.5 + 0.5 * np.cos(3 * np.arctan2(v, u) + rng.uniform(0, 2 * math.pi))
    return _mix(t, _jitter(rng, (40, 195, 215)), _jitter(rng, (215, 55, 175)))


def _shading(u: Array, v: Array, rng: np.random.Generator) -> Array:
    """Overall brightness and a soft light gradient across the object."""
    a = rng.uniform(0, 2 * math.pi)
    return (rng.uniform(0.85, 1.1) * (1.0 + 0.12 * (math.cos(a) * u + math.sin(a) * v))).astype(np.float32)


SHAPES: dict[int, Callable[[Array, Array], Array]] = {
    1: _person, 2: _disc, 3: _square, 4: _triangle, 5: _star, 6: _ring,
}
TEXTURES: dict[int, Callable[[Array, Array, np.random.Generator], Array]] = {
    1: _tex_person, 2: _tex_disc, 3: _tex_square, 4: _tex_triangle, 5: _tex_star, 6: _tex_ring,
}


# --------------------------------------------------------------------------- background
def _background(rng: np.random.Generator, size: int) -> Array:
    """Muted base colour + smooth noise + a linear gradient + faint stripes (float32 HxWx3)."""
    base = rng.uniform(70, 190, 3)
    base = 0.5 * base + 0.5 * base.mean()
    k = int(rng.integers(3, 8))
    noise = _upsample(rng.normal(0.0, 1.0, (k, k, 3)), size) * rng.uniform(14, 28)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(a) * xx + math.sin(a) * yy) * rng.uniform(25, 60)
    b, period = rng.uniform(0, math.pi), rng.uniform(5, 16) / size
    stripes = np.sin(2 * math.pi * (math.cos(b) * xx + math.sin(b) * yy) / period) * rng.uniform(4, 9)
    tint = rng.uniform(0.6, 1.0, 3)
    img = base + noise + ramp[..., None] * tint + stripes[..., None]
    return img.astype(np.float32)


def _upsample(low: Array, size: int) -> Array:
    """Bilinear upsampling of a k x k x 3 grid to size x size x 3 (two small matmuls)."""
    k = low.shape[0]
    pos = np.clip((np.arange(size) + 0.5) * k / size - 0.5, 0, k - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, k - 1)
    w = np.zeros((size, k))
    w[np.arange(size), i0] += 1 - (pos - i0)
    w[np.arange(size), i1] += pos - i0
    per_channel = w @ np.moveaxis(low, 2, 0) @ w.T  # (3, size, size)
    return np.moveaxis(per_channel, 0, 2)
