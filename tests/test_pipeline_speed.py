"""benchmarks/pipeline_speed.py's arithmetic: the FLOP counter against textbook
conv / linear counts, the walk's formula against the real transition matrix,
the permutohedral lattice against a scalar transcription of pydensecrf's
init, the CRF formula against its terms written out, fraction of peak."""

import sys
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import pipeline_speed as ps
finally:
    sys.path.remove(str(REPO / "benchmarks"))


def conv_flops(n: int, cin: int, cout: int, k: int, h: int, w: int, groups: int = 1) -> int:
    """The textbook forward count of a stride-1 'same' convolution: 2 Cin/groups Cout k k H W N."""
    return 2 * (cin // groups) * cout * k * k * h * w * n


class Tiny(torch.nn.Module):
    """A conv, a depthwise conv and a linear layer (no bias terms to argue about)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.fc = torch.nn.Linear(8 * 6 * 5, 4, bias=False)

    def forward(self, x):
        return self.fc(self.dw(self.conv(x)).flatten(1))


N, H, W = 2, 6, 5
FORWARD = conv_flops(N, 3, 8, 3, H, W) + conv_flops(N, 8, 8, 3, H, W, groups=8) + 2 * N * (8 * H * W) * 4


def test_counted_forward_is_the_textbook_count():
    model, x = Tiny(), torch.randn(N, 3, H, W)
    assert ps.counted_flops(lambda: model(x)).flops == FORWARD
    counted, book, modules = ps.textbook_flops(model, x)
    assert (counted, book, modules) == (FORWARD, FORWARD, 3)


def test_forward_and_backward_are_three_forwards_depthwise_included():
    """Each conv / linear backward is a grad input and a grad weight, a forward's FLOPs each
    (the input requires grad, so the first layer has both). torch's own formula counts the
    depthwise weight gradient as a dense conv (x 8 channels here): the counter corrects it."""
    model, x = Tiny(), torch.randn(N, 3, H, W, requires_grad=True)
    c = ps.counted_flops(lambda: model(x).sum().backward())
    assert c.flops == 3 * FORWARD
    dw = conv_flops(N, 8, 8, 3, H, W, groups=8)
    assert c.torch_flops == 3 * FORWARD + 7 * dw  # its weight gradient counted 8 x instead of 1 x
    assert c.sparse_flops == 0


def test_first_layer_without_input_grad_has_no_grad_input():
    conv, x = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.randn(1, 3, 7, 7)
    assert ps.counted_flops(lambda: conv(x).sum().backward()).flops == 2 * conv_flops(1, 3, 4, 3, 7, 7)


def test_the_walks_matrix_has_the_formulas_entries_and_products():
    from wsss_core.random_walk import transition_matrix

    h, w, radius, k, steps = 9, 13, 4, 3, 8
    m = transition_matrix(torch.rand(h, w, generator=torch.Generator().manual_seed(0)) * 0.5, radius, beta=3.0)
    crow, col = m.crow_indices().numpy(), m.col_indices().numpy()
    nnz = scipy.sparse.csr_matrix((m.values().numpy(), col, crow), shape=(h * w, h * w)).nnz
    by_hand = sum(1 for p in range(h * w) for dy in range(-radius + 1, radius) for dx in range(-radius + 1, radius)
                  if dy * dy + dx * dx < radius * radius and 0 <= p // w + dy < h and 0 <= p % w + dx < w)
    assert nnz == by_hand == ps.transition_nnz(h, w, radius)
    assert ps.walk_flops(h * w, nnz / (h * w), k, steps) == pytest.approx(2 * nnz * k * steps, rel=1e-12)
    y = torch.rand(h * w, k)

    def walked() -> None:
        z = y
        for _ in range(steps):
            z = m @ z
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = ps.counted_flops(walked)
    assert (c.sparse_flops, c.flops) == (2 * nnz * k * steps, 0)  # torch alone: 2 (h w)^2 k per product
    assert c.torch_flops == 2 * (h * w) ** 2 * k * steps


def scalar_lattice(features: np.ndarray) -> int:
    """pydensecrf's sequential `Permutohedral::init`, point by point (its own rounding rule)."""
    n, d = features.shape
    canonical = [[i if j <= d - i else i - (d + 1) for j in range(d + 1)] for i in range(d + 1)]
    inv_std = np.float32(np.sqrt(2.0 / 3.0) * (d + 1))
    scale = [np.float32(1.0 / np.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    keys = set()
    for f in features.astype(np.float32):
        el, sm = [np.float32(0)] * (d + 1), np.float32(0)
        for j in range(d, 0, -1):
            cf = f[j - 1] * scale[j - 1]
            el[j] = sm - np.float32(j) * cf
            sm = sm + cf
        el[0] = sm
        rem0, total = [], 0
        for e in el:
            v = e * np.float32(1.0 / (d + 1))
            up, down = np.ceil(v) * (d + 1), np.floor(v) * (d + 1)
            rem0.append(int(up if up - e < e - down else down))
            total += rem0[-1] // (d + 1)
        rank = [0] * (d + 1)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if el[i] - rem0[i] < el[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i], rem0[i] = rank[i] + d + 1, rem0[i] + d + 1
            elif rank[i] > d:
                rank[i], rem0[i] = rank[i] - d - 1, rem0[i] - d - 1
        for r in range(d + 1):
            keys.add(tuple(rem0[i] + canonical[r][rank[i]] for i in range(d)))
    return len(keys)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_lattice_points_match_a_scalar_transcription_of_pydensecrf(d):
    f = np.random.default_rng(d).uniform(0, 6, (300, d)).astype(np.float32)
    assert ps.lattice_vertices(f) == scalar_lattice(f)
    assert ps.lattice_vertices(f[:1]) == d + 1  # one point: its simplex's corners
    assert d + 1 < ps.lattice_vertices(f) <= (d + 1) * len(f)


def test_lattice_rejects_bad_features():
    with pytest.raises(ValueError, match=r"features must be \(N, d\)"):
        ps.lattice_vertices(np.zeros(5))


def test_crf_flops_is_the_sum_of_its_terms():
    n, labels, its, (d1, m1), (d2, m2) = 1000, 3, 10, (2, 400), (5, 250)

    def filt(d: int, m: int, v: int) -> int:
        return v * (2 * (d + 1) * n + 3 * (d + 1) * m + 2 * (d + 1) * n)  # splat, blur, slice
    setup = filt(d1, m1, 1) + 2 * n + filt(d2, m2, 1) + 2 * n + 5 * n * labels
    iteration = n * labels + filt(d1, m1, labels) + 4 * n * labels + filt(d2, m2, labels) + 4 * n * labels \
        + 5 * n * labels
    assert ps.crf_flops(n, labels, its, [(d1, m1), (d2, m2)]) == setup + its * iteration == 1_806_100


def test_fraction_of_peak():
    assert ps.fraction_of_peak(3e9, 0.5, 12e9) == pytest.approx(0.5)
    assert ps.fraction_of_peak(0, 1.0, 1e9) == 0
    with pytest.raises(ValueError, match="must be > 0"):
        ps.fraction_of_peak(1e9, 0.0, 1e9)


def test_stage_names():
    assert ps.parse_stages(None) == list(ps.STAGES)
    assert ps.parse_stages(["predict", "crf,cams"]) == ["cams", "crf", "predict"]  # pipeline order
    with pytest.raises(ValueError, match="^unknown stage 'walk'; known: classifier, cams, crf, "):
        ps.parse_stages(["crf", "walk"])


def test_loader_note_says_whether_one_process_keeps_up():
    assert "keeps up" in ps.loader_note(40.0, 4.0) and "x10.0" in ps.loader_note(40.0, 4.0)
    assert ps.loader_note(3.0, 10.0).endswith("too slow: needs >= 4 workers")


def test_table_rows():
    row = {"stage": "crf", "flops_per_image": 1.5e9, "seconds_per_image": 0.5, "gflops_per_s": 3.0,
           "fraction_of_peak": 0.025, "notes": "formula"}
    assert ps.markdown_table([row]).splitlines()[2] == "| crf | 1.5 G | 0.5000 | 3.00 | 2.50 % | formula |"
