"""The CAMs of one image as the extraction computed them (`CamResult`), the
two resolutions the stages read, and how CAM files hold them.

A CAM file stores each scale's map at the classifier's feature resolution
(float32, or 8-bit codes with a per-class range for LID-sized runs:
`cams.storage`); `CamResult.cam` (stride 4) and `.high_res` (full size) are
made from them on first use, as IRNet's `make_cam` makes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CamResult", "Normalize", "Storage", "STORAGES", "stride4_size", "encode_uint8", "decode_uint8"]

Normalize = Literal["per_class", "global"]
Storage = Literal["float32", "uint8"]
STORAGES = ("float32", "uint8")
NORM_EPS = 1e-5  # IRNet: cam / (max + 1e-5)


class CamResult:
    """CAMs of one image, kept in the form the extraction computed them.

    keys: (K,) int64 1-based class ids. scale_maps: one (K, h_s, w_s) float32
    map per input scale, at the classifier's feature resolution, flips folded
    in and in plain-CAM units (see the module docstring); image_size: (H, W);
    normalize: "per_class" or "global". The two maps the stages use are made
    from them on first use, exactly as IRNet's `make_cam` does:
    `cam` (K, ceil(H/4), ceil(W/4)) and `high_res` (K, H, W): the scale maps
    upsampled bilinearly, summed, ReLU, divided by the max (+1e-5); both in
    [0, 1]. A file holds the scale maps: ~12 KB per class for a 500x375 image
    at two scales; it gives back exactly the maps of the result it came from.
    `stored("uint8")` is the same result with each class's map of each scale
    held as 8-bit codes and its range (maps 4x smaller, every value within
    half a step of (max - min) / 255 of the float32 one).
    """

    def __init__(self, keys: Any, scale_maps: Sequence[Any], image_size: Sequence[int],
                 normalize: Normalize = "per_class") -> None:
        self._codes: list[tuple[np.ndarray, np.ndarray]] | None = None  # uint8 storage: (codes, [lo, step])
        self.keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        self.scale_maps = [np.ascontiguousarray(m, dtype=np.float32) for m in scale_maps]
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.normalize = normalize
        k = len(self.keys)
        if normalize not in ("per_class", "global"):
            raise ValueError(f"CamResult: normalize must be 'per_class' or 'global', got {normalize!r}")
        if not self.scale_maps or any(m.ndim != 3 or m.shape[0] != k or 0 in m.shape[1:] for m in self.scale_maps):
            raise ValueError(f"CamResult: expected one or more (K, h, w) scale maps with K = {k}, "
                             f"got {[m.shape for m in self.scale_maps]}")
        if min(self.image_size) < 1:
            raise ValueError(f"CamResult: image size must be positive, got {self.image_size}")
        self._maps: dict[tuple[int, int], np.ndarray] = {}

    @property
    def cam(self) -> np.ndarray:
        """(K, ceil(H/4), ceil(W/4)) float32 in [0, 1]: the random walk's seeds."""
        return self.resized(stride4_size(*self.image_size))

    @property
    def high_res(self) -> np.ndarray:
        """(K, H, W) float32 in [0, 1]: the full-size maps (CRF, scores, pictures)."""
        return self.resized(self.image_size)

    def resized(self, size: tuple[int, int]) -> np.ndarray:
        """The scale maps upsampled to `size`, summed, ReLU, normalised (cached)."""
        if size not in self._maps:
            total = torch.zeros((1, len(self.keys), *size))
            for m in self.scale_maps if len(self.keys) else ():  # no classes: nothing to upsample
                total += F.interpolate(torch.from_numpy(m)[None], size=size, mode="bilinear", align_corners=False)
            self._maps[size] = _normalise(total[0], self.normalize).numpy()
        return self._maps[size]

    @property
    def storage(self) -> Storage:
        """How the scale maps are held (and written): "float32", or "uint8" codes with a range."""
        return "float32" if self._codes is None else "uint8"

    def stored(self, storage: Storage) -> "CamResult":
        """This result as a file of `storage` holds it: itself for float32; for
        uint8, the result whose maps are the decoded 8-bit codes of these maps."""
        if storage not in STORAGES:
            raise ValueError(f"CamResult: storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        if storage == self.storage:
            return self
        if storage == "float32":
            return CamResult(self.keys, self.scale_maps, self.image_size, self.normalize)
        return CamResult._from_codes(self.keys, [encode_uint8(m) for m in self.scale_maps], self.image_size,
                                     self.normalize)

    @classmethod
    def _from_codes(cls, keys: Any, codes: Sequence[tuple[np.ndarray, np.ndarray]], image_size: Sequence[int],
                    normalize: Normalize) -> "CamResult":
        res = cls(keys, [decode_uint8(c, r) for c, r in codes], image_size, normalize)
        res._codes = [(np.ascontiguousarray(c, np.uint8), np.ascontiguousarray(r, np.float32)) for c, r in codes]
        return res

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        """Arrays for `store.save_npz`: keys, image size, normalisation, and per
        scale i `scale<i>` (float32 maps, or uint8 codes with `range<i>`: (K, 2) lo, step)."""
        out = {"keys": self.keys, "image_size": np.asarray(self.image_size, np.int64),
               "per_class": np.asarray(self.normalize == "per_class")}
        if self._codes is None:
            out.update({f"scale{i}": m for i, m in enumerate(self.scale_maps)})
        else:
            for i, (c, r) in enumerate(self._codes):
                out.update({f"scale{i}": c, f"range{i}": r})
        return out

    @classmethod
    def from_npz(cls, source: str | Path | Mapping[str, Any]) -> "CamResult":
        """Load from an .npz path or a mapping (e.g. `np.load(...)`)."""
        from .store import FileError, read_npz

        what = "CAM file"
        if isinstance(source, (str, Path)):
            what, source = f"{source}: CAM file", read_npz(source, "CAM file")
        names = sorted((k for k in source if k.startswith("scale")), key=lambda k: int(k[5:]) if k[5:].isdigit() else -1)
        if "high_res" in source or not {"keys", "image_size", "per_class"} <= set(source) or not names:
            raise FileError(f"{what} is not in this version's format (keys, image_size, per_class, scale0, ...); "
                            "rerun the cams stage (--force)")
        try:
            maps = [np.asarray(source[k]) for k in names]
            size = [int(v) for v in np.asarray(source["image_size"])]
            normalize = "per_class" if bool(source["per_class"]) else "global"
            if all(m.dtype == np.uint8 for m in maps):
                ranges = [np.asarray(source.get(f"range{k[5:]}", np.zeros(0))) for k in names]
                if any(m.ndim != 3 or r.shape != (m.shape[0], 2) for r, m in zip(ranges, maps)):
                    raise ValueError("uint8 scale maps need to be (K, h, w), each with a (K, 2) range<i>")
                if not all(r.dtype == np.float32 and np.isfinite(r).all() and (r[:, 1] >= 0).all() for r in ranges):
                    raise ValueError("the ranges of uint8 scale maps must be finite float32 (lo, step >= 0)")
                return cls._from_codes(source["keys"], list(zip(maps, ranges)), size, normalize)
            if any(m.dtype != np.float32 for m in maps):
                raise ValueError(f"scale maps must be all float32 or all uint8, got {[str(m.dtype) for m in maps]}")
            return cls(source["keys"], maps, size, normalize)
        except (ValueError, TypeError, IndexError) as e:
            raise FileError(f"{what}: {e}; rerun the cams stage (--force)") from None


def stride4_size(height: int, width: int) -> tuple[int, int]:
    """Size of the stride-4 map: (ceil(H / 4), ceil(W / 4)), as IRNet's strided size."""
    return (height + 3) // 4, (width + 3) // 4


def encode_uint8(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, h, w) float32 -> (uint8 codes (K, h, w), (K, 2) float32 [lo, step]):
    each class map's min .. max in 255 equal steps, rounded to the nearest."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3 or not np.isfinite(maps).all():
        raise ValueError(f"encode_uint8: expected finite (K, h, w) maps, got shape {maps.shape}")
    k = maps.shape[0]
    lo = maps.reshape(k, -1).min(1) if maps.size else np.zeros(k, np.float32)
    step = ((maps.reshape(k, -1).max(1) - lo) / np.float32(255) if maps.size else lo).astype(np.float32)
    safe = np.where(step > 0, step, np.float32(1))[:, None, None]
    codes = np.clip(np.rint((maps - lo[:, None, None]) / safe), 0, 255).astype(np.uint8)
    return codes, np.stack([lo, step], 1).astype(np.float32)


def decode_uint8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """The float32 maps of `encode_uint8`'s codes: lo + code * step, per class."""
    r = np.asarray(ranges, np.float32)
    return (r[:, 0, None, None] + np.asarray(codes).astype(np.float32) * r[:, 1, None, None]).astype(np.float32)


def _normalise(maps: torch.Tensor, normalize: str) -> torch.Tensor:
    """ReLU, then divide by the per-class max (K, 1, 1) or the global max, + NORM_EPS."""
    maps = maps.clamp(min=0)
    if normalize == "per_class":
        top = maps.flatten(1).amax(1)[:, None, None]
    else:
        top = maps.amax()
    return maps / (top + NORM_EPS)
