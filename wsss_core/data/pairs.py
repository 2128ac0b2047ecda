"""(image, label map) pairs for training on what a stage made: the images of a
labelled split, the label maps read per image id (the confident labels for the
boundary net, the pseudo masks for the weak segmenter)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


class ImagesWithLabels:
    """(image, label map) pairs of the given ids; `read_labels(id)` gives an id's label map."""

    def __init__(self, images: Any, ids: list[str], read_labels: Callable[[str], np.ndarray]):
        self.images, self.ids, self.read_labels = images, list(ids), read_labels

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self, sid: str) -> np.ndarray:
        return self.read_labels(sid)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        sid = self.ids[i]
        return self.images.image(sid), self.labels(sid)
