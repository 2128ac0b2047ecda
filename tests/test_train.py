"""The fit loop: exact resume, NaN stop, schedules, sampling and sharding."""

import numpy as np
import pytest
import torch
from torch import nn

from wsss_core.data.sampling import EpochSampler, sample_weights
from wsss_core.train import FitConfig, build_optimizer, fit, lr_lambda, param_checksum


class Toy(torch.utils.data.Dataset):
    """Random 'images' whose label is whether the mean is positive; the
    per-item noise is seeded from (epoch, index) like LabelledTensors."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0).float()[:, None]
        self.epoch = 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.epoch * 1000 + i)
            noise = 0.1 * torch.randn(3, 8, 8)
        return self.x[i] + noise, self.y[i], i


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 1))


def bce(model, batch):
    return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])


def train(out_dir, epochs=3, stop=None, lr=0.05, weights=None, loss=bce):
    model = tiny_model()
    res = fit(model, Toy(), loss, [{"params": model.parameters()}], "sgd", lr, 1e-4,
              FitConfig(epochs=epochs, batch_size=8, seed=3, schedule="step", step_size=1, gamma=0.5,
                        stop_after_epochs=stop),
              out_dir, torch.device("cpu"), sample_weights=weights)
    return model, res


def test_training_reduces_loss_and_keeps_its_history_in_the_checkpoint(tmp_path):
    from wsss_core.store import read_torch

    model, res = train(tmp_path, epochs=4)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert read_torch(tmp_path / "checkpoint.pt", "checkpoint")["history"] == res.history
    assert not (tmp_path / "history.json").exists()  # the stage's to write (trained.fit_or_load), once
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    # step schedule, step_size 1, gamma 0.5: lr halves each epoch
    assert [round(h["lr"][0], 6) for h in res.history] == [0.025, 0.0125, 0.00625, 0.003125]


def test_resume_continues_to_the_same_result(tmp_path):
    straight, res_a = train(tmp_path / "a")
    _, part = train(tmp_path / "b", stop=1)          # "interrupted" after epoch 1
    assert len(part.history) == 1
    resumed, res_b = train(tmp_path / "b")            # new process state, resumes from the checkpoint
    assert res_b.resumed_from == 1
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert [h["loss"] for h in res_a.history] == [h["loss"] for h in res_b.history]


def test_eval_every_evaluates_every_nth_and_the_last_epoch_and_changes_no_weight(tmp_path):
    def run(every):
        calls = []

        def evaluate(model):
            assert not model.training
            calls.append(len(calls))
            return {"val_score": float(model(torch.ones(1, 3, 8, 8)).item())}

        model = tiny_model()
        res = fit(model, Toy(), bce, [{"params": model.parameters()}], "sgd", 0.05, 1e-4,
                  FitConfig(epochs=5, batch_size=8, seed=3, eval_every=every), tmp_path / str(every),
                  torch.device("cpu"), eval_fn=evaluate)
        return model, res.history

    every_epoch, h1 = run(1)
    sparse, h3 = run(3)
    assert [h["epoch"] for h in h1 if "val_score" in h] == [1, 2, 3, 4, 5]
    assert [h["epoch"] for h in h3 if "val_score" in h] == [3, 5]  # the 3rd and the last
    assert [h["val_score"] for h in h3 if "val_score" in h] == [h1[2]["val_score"], h1[4]["val_score"]]
    assert [h["loss"] for h in h1] == [h["loss"] for h in h3]
    for p, q in zip(every_epoch.parameters(), sparse.parameters()):
        assert torch.equal(p, q)  # evaluation only: the same weights (dropout back on after each evaluation)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    def nan_loss(model, batch):
        return bce(model, batch) * float("nan")

    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, step 1.*lower the learning rate"):
        train(tmp_path, loss=nan_loss)


def test_lr_schedules():
    step = lr_lambda("step", 100, 10, step_size=3, gamma=0.2)
    assert step(0) == 1.0 and step(29) == 1.0 and step(30) == pytest.approx(0.2) and step(60) == pytest.approx(0.04)
    poly = lr_lambda("poly", 100, 10)
    assert poly(0) == 1.0 and poly(50) == pytest.approx(0.5**0.9) and poly(100) == 0.0
    with pytest.raises(ValueError):
        lr_lambda("cosine", 1, 1)


def test_shards_are_disjoint_and_cover_the_epoch():
    shards = [list(EpochSampler(10, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(10))
    s = EpochSampler(10, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(10))


def test_weighted_sampling_follows_the_weights():
    w = np.array([0.7, 0.1, 0.1, 0.1])
    s = EpochSampler(4, weights=w, seed=0)
    counts = np.zeros(4)
    for e in range(500):
        s.set_epoch(e)
        counts += np.bincount(list(s), minlength=4)
    assert counts / counts.sum() == pytest.approx(w, abs=0.02)


def test_repeat_factor_weights_by_hand():
    # class 0 in 3 of 4 images (f=0.75), class 1 in 1 of 4 (f=0.25); t=0.5
    y = np.array([[1, 0], [1, 0], [1, 1], [0, 0]])
    w = sample_weights(y, "repeat_factor", 0.5)
    r1 = np.sqrt(0.5 / 0.25)  # rare class factor; common class factor is 1
    expected = np.array([1, 1, r1, 1]) / (3 + r1)
    assert w == pytest.approx(expected)
    assert sample_weights(y, "none") is None


def test_class_aware_weights_give_each_class_equal_mass():
    y = np.array([[1, 0]] * 8 + [[0, 1]] * 2 + [[0, 0]] * 2)
    w = sample_weights(y, "class_aware")
    assert w[:8].sum() == pytest.approx(w[8:10].sum()) == pytest.approx(w[10:].sum()) == pytest.approx(1 / 3)


def test_adamw_decays_weights_apart_from_the_gradient_adam_through_it():
    """With a zero loss gradient, AdamW's step is the decoupled decay w * (1 - lr * wd) alone; Adam's L2
    penalty goes through the adaptive step instead, which moves every weight by about lr towards 0."""
    w0 = torch.tensor([2.0, -0.5, 0.25])
    lr, wd = 0.1, 0.01
    moved = {}
    for name in ("adamw", "adam"):
        w = nn.Parameter(w0.clone())
        opt = build_optimizer([{"params": [w]}], name, lr, wd)
        w.grad = torch.zeros_like(w)
        opt.step()
        moved[name] = w.detach()
    torch.testing.assert_close(moved["adamw"], w0 * (1 - lr * wd))
    torch.testing.assert_close(moved["adam"], w0 - lr * torch.sign(w0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer([{"params": [nn.Parameter(w0.clone())]}], "lamb", lr, wd)


def test_param_checksum_detects_change():
    m = tiny_model()
    c = param_checksum(m)
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] += 1.0
    assert param_checksum(m) == pytest.approx(c + 1.0)


def test_a_last_batch_of_one_image_can_be_dropped(tmp_path):
    """smp's ASPP pooling ends in BatchNorm on a 1x1 map: a batch of one fails in train mode."""
    import torch
    from torch import nn

    from wsss_core.train import FitConfig, fit

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 9  # 9 % 4 == 1

        def __getitem__(self, i):
            return torch.full((3,), float(i)), i

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    seen = []

    def loss(m, batch):
        seen.append(len(batch[0]))
        return m(batch[0]).pow(2).mean()

    groups = [{"params": list(model.parameters())}]
    fit(model, Tiny(), loss, groups, "sgd", 0.01, 0.0,
        FitConfig(epochs=1, batch_size=4, drop_single_last=True), tmp_path / "a", torch.device("cpu"))
    assert seen == [4, 4]
    seen.clear()
    plain = nn.Linear(3, 4)
    fit(plain, Tiny(), loss, [{"params": list(plain.parameters())}], "sgd", 0.01, 0.0,
        FitConfig(epochs=1, batch_size=4), tmp_path / "b", torch.device("cpu"))
    assert seen == [4, 4, 1]


def test_loader_workers_see_each_epoch(tmp_path):
    """Augmentation is seeded from the epoch: worker processes must get the new epoch every epoch."""
    import torch
    from torch import nn

    from wsss_core.train import FitConfig, fit

    class EpochEcho(torch.utils.data.Dataset):
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3,), float(self.epoch)), i

    model = nn.Linear(3, 1)
    seen = []

    def loss(m, batch):
        seen.extend(batch[0][:, 0].tolist())
        return m(batch[0]).pow(2).mean()

    fit(model, EpochEcho(), loss, [{"params": list(model.parameters())}], "sgd", 0.01, 0.0,
        FitConfig(epochs=2, batch_size=2, num_workers=2), tmp_path, torch.device("cpu"))
    assert seen == [0.0] * 4 + [1.0] * 4


def test_history_plot_draws_only_the_evaluated_epochs():
    import matplotlib

    matplotlib.use("Agg")
    from wsss_core.viz import plot_history

    history = [{"epoch": e, "loss": 1.0 / e, "lr": [0.1, 0.01], **({"val_miou": e / 10} if e in (3, 5) else {})}
               for e in range(1, 6)]
    fig = plot_history(history, metrics=("val_miou",))
    line = fig.axes[2].lines[0]
    assert list(line.get_xdata()) == [3, 5] and list(line.get_ydata()) == [0.3, 0.5]
    assert list(fig.axes[0].lines[0].get_xdata()) == [1, 2, 3, 4, 5]


def test_evaluated_epochs_and_the_best_among_them():
    from wsss_core.stages.segmentation import _BestKeeper
    from wsss_core.train import evaluated

    assert [e for e in range(1, 6) if evaluated(e, 5, 10)] == [5]  # N beyond the epochs: the last only
    assert [e for e in range(1, 26) if evaluated(e, 25, 4)] == [4, 8, 12, 16, 20, 24, 25]
    history = [{"epoch": e, **({"val_miou": v} if v is not None else {})}
               for e, v in zip(range(1, 6), (None, 0.4, None, 0.3, 0.35))]
    assert _BestKeeper.chosen(history, best=True) == 2  # the best evaluated epoch, not one without a score
    assert _BestKeeper.chosen(history, best=False) == 5
