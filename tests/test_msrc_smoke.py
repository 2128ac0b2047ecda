"""Real photographs end to end (small): MSRC through data, classifier, label
filter, CAMs and CRF, with the masks used only for scoring."""

import json

import numpy as np
import pytest

from wsss_core import stages
from wsss_core.artifacts import read_kept_ids
from wsss_core.config import load_config

from conftest import REPO


@pytest.mark.slow
def test_msrc_small_run_through_crf(msrc_root, tmp_path):
    cfg = load_config(REPO / "params" / "msrc.yaml", {
        "data.limit": 24, "classifier.epochs": 1, "classifier.image_size": 128, "cams.scales": [1.0, 0.5],
        "crf.iterations": 3, "crf.workers": 0,
    })
    run = stages.open_run(tmp_path / "run", cfg)
    for name in ("data", "classifier", "label_filter", "cams", "crf"):
        stages.run_stage(name, cfg, run)
    summary = json.loads((run.make_folder("data") / "summary.json").read_text())
    assert summary["splits"]["train"]["images"] == 24 and summary["classes"][0] == "background"
    assert len(read_kept_ids(run)) == 24  # filter disabled, nothing excluded
    cams = run.manifest("cams")["metrics"]
    assert len(list((run.make_folder("cams") / "cams").glob("*.npz"))) == 24
    assert 0.0 < cams["miou_best"] < 1.0
    crf = run.manifest("crf")["metrics"]["quality"]
    assert crf["images"] == 24 and 0.3 < crf["coverage"] <= 1.0 and crf["precision"] > 0.3
    # the CRF-refined confident labels are scored on the same masks as the raw CAMs
    assert np.isfinite(crf["miou"])
