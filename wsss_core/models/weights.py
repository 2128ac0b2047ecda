"""Where backbone weights come from: 'imagenet', 'random' or a local state-dict file.

Everything here is resolved *before* a network is built, so a missing file or
unreachable download fails at once. ImageNet weights of torchvision backbones
are taken from the torch.hub cache when present; otherwise a download is tried
only if the host answers within a few seconds, else the error tells the user
to pass a local file.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch

from ..store import FileError, read_torch
from .backbone import StateDict, WeightsError, WeightsNotFoundError

PROBE_TIMEOUT = 3.0  # seconds to wait for the download host before giving up


@dataclass(frozen=True)
class WeightsSource:
    """Resolved weights: nothing (random), a local file or a download URL."""

    kind: Literal["random", "file", "url"]
    location: str = ""

    def describe(self) -> str:
        return self.kind if self.kind == "random" else self.location

    def load(self) -> StateDict:
        """Read the state dict (CPU tensors)."""
        if self.kind == "file":
            return read_state_dict(self.location)
        if self.kind == "url":
            try:
                return torch.hub.load_state_dict_from_url(self.location, map_location="cpu", progress=True,
                                                          check_hash=True, weights_only=True)
            except Exception as e:  # network, disk or hash problems: one clear message
                raise WeightsError(f"downloading {self.location} failed: {e}; pass a local file path instead") from e
        raise WeightsError("random weights have no state dict")


def read_state_dict(path: str | Path) -> StateDict:
    """torch.load a weights file (tensors only), naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        return read_torch(path, "state dict")
    except FileError as e:
        raise WeightsError(str(e)) from None


def local_weights(weights: str) -> WeightsSource:
    """A weights spec that is a path: must be an existing file."""
    path = Path(os.path.expandvars(os.path.expanduser(weights)))
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file not found: {path} (weights must be 'imagenet', 'random' or the path of a state-dict file)"
        )
    return WeightsSource("file", str(path))


def hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps (or would keep) the file downloaded from `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if a TCP connection to host:port opens within `timeout` (never hangs:
    the probe, DNS included, runs in a daemon thread)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def download_weights(backbone: str, url: str) -> WeightsSource:
    """The hub-cached file for `url`, or the URL if its host answers; else a clear error."""
    cached = hub_cache_path(url)
    if cached.is_file():
        return WeightsSource("file", str(cached))
    host = urlparse(url).hostname or ""
    if not host_reachable(host):
        raise WeightsError(
            f"ImageNet weights for {backbone!r} are not in the torch.hub cache ({cached}) and {host} cannot be "
            f"reached (no internet?). Pass the path of a local state-dict file as weights "
            f"(e.g. classifier.weights: /path/to/{cached.name}), copy that file to {cached}, or use 'random'."
        )
    return WeightsSource("url", url)
