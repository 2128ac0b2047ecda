"""Shared test fixtures: repository paths, the CI params, the real MSRC data."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
MSRC = (REPO.parent / "shared" / "data" / "msrc-voc").resolve()

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    """Generated datasets go to a per-session cache, not the user's home."""
    if "WSSS_CACHE" not in os.environ:
        os.environ["WSSS_CACHE"] = str(tmp_path_factory.mktemp("wsss-cache"))
    yield


@pytest.fixture
def ci_config():
    return REPO / "params" / "ci.yaml"


@pytest.fixture
def msrc_root():
    if not MSRC.is_dir():
        pytest.skip(f"real data not found at {MSRC} (the repository must sit next to shared/)")
    return MSRC


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory, _cache_in_tmp):
    """A CI-sized run with data, classifier, label filter, CAMs and CRF done."""
    from wsss_core import stages
    from wsss_core.config import load_config

    cfg = load_config(REPO / "params" / "ci.yaml")
    run = stages.open_run(tmp_path_factory.mktemp("ci-run"), cfg)
    for name in ("data", "classifier", "label_filter", "cams", "crf"):
        stages.run_stage(name, cfg, run)
    return cfg, run
