"""Class activation maps: Grad-CAM and Grad-CAM++, multi-scale with flips.

A model is anything with `features(x) -> A (B, C, h, w)` (the CAM layer) and
`logits_from_features(A) -> logits (B, N)` (`CamModel`). Class ids are 1-based
dataset ids (0 = background never gets a CAM); by default class k is head
output k - 1, or `head_class_ids[j]` names the class of head output j.

Per scale and image (one forward for all requested classes, the image and its
horizontal flip batched), with g = d(logit_c)/dA:

- Grad-CAM:   w_k = mean_ij g_kij;                       map = ReLU(sum_k w_k A_k)
- Grad-CAM++: alpha = g^2 / (2 g^2 + sum_ij(A_k) g^3 + 1e-6), 0 where g == 0,
              w_k = sum_ij alpha_kij ReLU(g_kij);        map = ReLU(sum_k w_k A_k)
  (the exp(score) closed form of Chattopadhay et al., eq. 19, with the same
  eps and zero-gradient handling as pytorch-grad-cam.) Note: for a GAP head
  g = W_ck / (h w) is ~1e-4, so g^2 << 1e-6 and the eps dominates the
  denominator: alpha ~ g^2 / 1e-6 and the weights behave like ReLU(W_c)^3.
  That is what the peer computes, and it is matched here on purpose.
- Grad-CAM++ as the NoPeopleAllowed seed computes it ("gradcam++exp"): the
  same formula with g = d exp(logit_c)/dA = exp(logit_c) d(logit_c)/dA and
  eps 1e-5: alpha = g^2 / (2 g^2 + sum_ij(A_k) g^3 + 1e-5),
  w_k = sum_ij alpha_kij ReLU(g_kij). Computed in float64 (exp of a logit).

Gradients with respect to A only involve the part of the network after A, so
the backbone always runs under `torch.no_grad`. When the model has a GAP +
linear head (`head: nn.Linear`, `logits_from_features(A) == head(A.mean((2, 3)))`,
checked on the actual features), d(logit_c)/dA_kij = W_ck / (h w) for every
class at once and no backward pass is needed (Grad-CAM is then plain CAM,
ReLU(W_c . A), divided by h w). Otherwise, or with `closed_form=False`, one
batched backward (`torch.autograd.grad(..., is_grads_batched=True)`) through
`logits_from_features` gives the gradients of all classes (split into chunks
of classes only when K * B * C * h * w exceeds 16M values).

Multi-scale aggregation (IRNet `make_cam`): the image (H, W) is resized
bilinearly (align_corners=False) to (round(H s), round(W s)) for each scale s;
the map of the flipped copy is flipped back; each scale's map is multiplied by
its number of feature cells h*w ("plain-CAM units": for a GAP head g carries a
factor 1/(h w), so a Grad-CAM map is W_c . A / (h w) and plain summing would
weight scale 0.5 16x more than scale 2.0; with the factor, Grad-CAM on a GAP +
linear head sums exactly IRNet's W_c . A over scales); the maps are upsampled bilinearly
(align_corners=False) straight from feature resolution to the stride-4 size
(ceil(H / 4), ceil(W / 4)) and to the full size (H, W) and summed over scales
and flips; then ReLU and division by the max (+1e-5) of each class map
("per_class", IRNet) or of all class maps together ("global"), separately for
each of the two resolutions. `CamResult` (`cam_maps.py`) keeps the per-scale
maps at feature resolution (what the CAM files store: a few KB per class) and
makes the two resolutions from them on first use.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cam_maps import CamResult, Normalize, stride4_size

__all__ = [
    "CamModel",
    "class_activation_maps",
    "raw_cams",
    "select_classes",
    "head_indices",
    "scaled_size",
    "has_gap_linear_head",
]

Method = Literal["gradcam", "gradcam++", "gradcam++exp"]
METHODS = ("gradcam", "gradcam++", "gradcam++exp")

GRADCAM_PP_EPS = 1e-6  # same as pytorch-grad-cam's GradCAMPlusPlus
GRADCAM_PP_EXP_EPS = 1e-5  # the NoPeopleAllowed seed's CamGradPlusPlus
_GRAD_BUDGET = 16 * 1024 * 1024  # max gradient values alive at once on the autograd path (64 MB in float32)


@runtime_checkable
class CamModel(Protocol):
    """What CAMs need from a classifier."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the CAM layer's activations A (B, C, h, w)."""
        ...

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
        """A (B, C, h, w) -> class logits (B, N); must treat batch items independently."""
        ...


# --------------------------------------------------------------------------- helpers
def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Input size at scale s: (round(H s), round(W s)) (Python rounding), at least 1."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def head_indices(class_ids: Sequence[int], num_outputs: int,
                 head_class_ids: Sequence[int] | None = None) -> list[int]:
    """Head output index of each 1-based class id (class k <-> output k-1 by default)."""
    ids = [int(k) for k in class_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_ids contain duplicates: {ids}")
    if head_class_ids is None:
        bad = [k for k in ids if not 1 <= k <= num_outputs]
        if bad:
            raise ValueError(f"class ids {bad} out of range: the head has {num_outputs} outputs "
                             f"(classes 1..{num_outputs}; 0 = background has no CAM)")
        return [k - 1 for k in ids]
    lookup = {int(k): j for j, k in enumerate(head_class_ids)}
    if len(lookup) != len(head_class_ids) or len(lookup) != num_outputs:
        raise ValueError(f"head_class_ids must list {num_outputs} distinct class ids, got {list(head_class_ids)}")
    bad = [k for k in ids if k not in lookup]
    if bad:
        raise ValueError(f"class ids {bad} are not predicted by the classifier (head classes {sorted(lookup)})")
    return [lookup[k] for k in ids]


def select_classes(
    values: torch.Tensor | np.ndarray | Sequence[float],
    mode: Literal["labels", "predicted"] = "labels",
    threshold: float = 0.5,
    *,
    head_class_ids: Sequence[int] | None = None,
    logits: torch.Tensor | np.ndarray | Sequence[float] | None = None,
) -> list[int]:
    """1-based class ids to compute CAMs for, ascending.

    mode "labels": `values` is the image's multi-hot label vector over the
    foreground classes (column k-1 <-> class k); returns the labelled classes
    (value > 0.5) that the head predicts. If there are none and `logits` is
    given, falls back to the predicted classes.
    mode "predicted": `values` are the head's logits (N,); returns the classes
    with sigmoid(logit) > threshold, or the argmax class if none passes.
    Head output j is class `head_class_ids[j]` (default j + 1).
    """
    v = _as_numpy_1d(values)
    if mode == "labels":
        known = set(range(1, len(v) + 1)) if head_class_ids is None else {int(k) for k in head_class_ids}
        ids = [k for k in range(1, len(v) + 1) if v[k - 1] > 0.5 and k in known]
        if not ids and logits is not None:
            return select_classes(logits, "predicted", threshold, head_class_ids=head_class_ids)
        return ids
    if mode != "predicted":
        raise ValueError(f"mode must be 'labels' or 'predicted', got {mode!r}")
    if len(v) == 0:
        return []
    names = list(range(1, len(v) + 1)) if head_class_ids is None else [int(k) for k in head_class_ids]
    if len(names) != len(v):
        raise ValueError(f"{len(v)} logits but {len(names)} head_class_ids")
    with np.errstate(over="ignore"):
        probs = 1.0 / (1.0 + np.exp(-v.astype(np.float64)))
    picked = np.flatnonzero(probs > threshold)
    if len(picked) == 0:
        picked = np.array([int(np.argmax(v))])
    return sorted(names[j] for j in picked)


def _as_numpy_1d(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected a 1-D vector of labels or logits, got shape {v.shape}")
    return v


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _num_outputs(model: nn.Module, a: torch.Tensor) -> int:
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    with torch.no_grad():
        return int(model.logits_from_features(a[:1]).shape[1])


def has_gap_linear_head(model: nn.Module, a: torch.Tensor | None = None) -> bool:
    """True if the model has `head: nn.Linear` and (when features `a` are given)
    `logits_from_features(a)` equals `head(a.mean((2, 3)))` on them."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or not hasattr(model, "logits_from_features"):
        return False
    if a is None:
        return True
    with torch.no_grad():
        ref = head(a.mean((2, 3)))
        got = model.logits_from_features(a)
    if got.shape != ref.shape:
        return False
    tol = 1e-4 * (1.0 + float(ref.abs().max()))
    return bool((got.float() - ref.float()).abs().max() <= tol)


# --------------------------------------------------------------------------- core
def _gradcampp_terms(g: torch.Tensor, sum_a: torch.Tensor) -> torch.Tensor:
    """alpha * ReLU(g) with alpha = g^2 / (2 g^2 + sum_ij(A) g^3 + eps), 0 where g == 0.

    Written as ReLU(g) g^2 / (g^2 (2 + sum_ij(A) g) + eps): the same value in
    fewer passes over the (large) gradient tensor; where g == 0 the numerator is
    0 and the denominator eps, so the result is 0 as in pytorch-grad-cam."""
    g2 = g * g
    den = g * sum_a
    den.add_(2).mul_(g2).add_(GRADCAM_PP_EPS)
    return den.reciprocal_().mul_(g2.mul_(g.clamp(min=0)))  # den has the full broadcast shape


def _weights_from_gradients(a: torch.Tensor, g: torch.Tensor, method: str,
                            logits: torch.Tensor | None = None) -> torch.Tensor:
    """Channel weights (K, B, C) from activations A (B, C, h, w) and gradients
    g (K, B, C, h, w) of the logits; "gradcam++exp" also needs the logits (K, B)."""
    if method == "gradcam":
        return g.mean((3, 4))
    sum_a = a.sum((2, 3))[None, :, :, None, None]
    if method == "gradcam++exp":  # g of exp(logit) = exp(logit) g of the logit
        g64 = g.double() * _exp_score(logits)[:, :, None, None, None]  # type: ignore[arg-type]
        return _exp_terms(g64, sum_a.double()).sum((3, 4)).to(a.dtype)
    return _gradcampp_terms(g, sum_a).sum((3, 4))


def _exp_score(logits: torch.Tensor) -> torch.Tensor:
    """exp(score) in float64, the score capped at 700 (exp(710) is inf in float64; a classifier's logits
    are far below either)."""
    return torch.exp(logits.double().clamp(max=700.0))


def _exp_terms(g: torch.Tensor, sum_a: torch.Tensor) -> torch.Tensor:
    """alpha * ReLU(g) of the seed's formula (eps 1e-5), divided through by g^2:
    ReLU(g) / (2 + sum_ij(A) g + eps / g^2), 0 where g == 0. The same value, but
    g = exp(logit) d(logit)/dA overflows g^3 for large logits, this form does not."""
    with torch.no_grad():
        out = g.clamp(min=0) / (2 + sum_a * g + GRADCAM_PP_EXP_EPS / (g * g))
        return torch.where(g != 0, out, torch.zeros_like(out))


def _weights_closed_form(a: torch.Tensor, head: nn.Linear, idx: Sequence[int], method: str) -> torch.Tensor:
    """Channel weights (K, B, C) for a GAP + linear head: g_ckij = W_ck / (h w) everywhere."""
    b, _, h, w = a.shape
    n = h * w
    g = head.weight[list(idx)].detach().to(a.dtype) / n  # (K, C), constant over space and batch
    if method == "gradcam":
        return g[:, None, :].expand(-1, b, -1)
    sum_a = a.sum((2, 3))[None]  # (1, B, C)
    if method == "gradcam++exp":
        logits = head(a.mean((2, 3)))[:, list(idx)].T.double()  # (K, B)
        g64 = g.double()[:, None, :] * _exp_score(logits)[:, :, None]  # (K, B, C)
        return (_exp_terms(g64, sum_a.double()) * n).to(a.dtype)
    return _gradcampp_terms(g[:, None, :], sum_a) * n  # the sum of h*w equal terms


def _weights_autograd(model: nn.Module, a: torch.Tensor, idx: Sequence[int], method: str) -> torch.Tensor:
    """Channel weights (K, B, C) from d(logit_idx[i]) / dA, by batched backward.

    Only `logits_from_features` is differentiated (A is a leaf): one backward
    with `is_grads_batched` gives the gradients of a chunk of classes; chunks
    keep at most about `_GRAD_BUDGET` gradient values alive at once."""
    k = len(idx)
    with torch.inference_mode(False), torch.enable_grad():
        leaf = a.detach().clone().requires_grad_(True)
        logits = model.logits_from_features(leaf)
        if logits.ndim != 2 or logits.shape[0] != a.shape[0]:
            raise ValueError(f"logits_from_features must return (B, N), got {tuple(logits.shape)}")
        budget = _GRAD_BUDGET // 8 if method == "gradcam++exp" else _GRAD_BUDGET  # float64 temporaries
        chunk = max(1, min(k, budget // max(1, a.numel())))
        out = []
        for start in range(0, k, chunk):
            sel = list(idx[start:start + chunk])
            go = torch.zeros((len(sel),) + tuple(logits.shape), dtype=logits.dtype, device=logits.device)
            go[torch.arange(len(sel), device=go.device), :, torch.tensor(sel, device=go.device)] = 1
            (g,) = torch.autograd.grad(logits, leaf, grad_outputs=go, is_grads_batched=True,
                                       retain_graph=start + chunk < k)
            with torch.no_grad():
                chosen = logits.detach()[:, sel].T  # (chunk, B): the exp(score) variant needs the scores
                out.append(_weights_from_gradients(a, g.detach().float(), method, chosen))
            del g
    return torch.cat(out)


def _maps_from_features(model: nn.Module, a: torch.Tensor, idx: Sequence[int], method: str,
                        closed_form: bool | None) -> torch.Tensor:
    """ReLU(sum_k w_k A_k) for every requested head output: (B, K, h, w)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    a = a.float()
    b, _, h, w = a.shape
    if len(idx) == 0:
        return a.new_zeros((b, 0, h, w))
    if closed_form is None:
        use_closed = has_gap_linear_head(model, a)
    elif closed_form:
        if not has_gap_linear_head(model, a):
            raise ValueError("closed_form=True needs a GAP + linear head: `head: nn.Linear` with "
                             "logits_from_features(A) == head(A.mean((2, 3)))")
        use_closed = True
    else:
        use_closed = False
    if use_closed:
        weights = _weights_closed_form(a, model.head, idx, method)
    else:
        weights = _weights_autograd(model, a, idx, method)
    return torch.einsum("kbc,bchw->bkhw", weights, a).clamp_(min=0)


def raw_cams(model: nn.Module, images: torch.Tensor, class_ids: Sequence[int], method: Method = "gradcam",
             closed_form: bool | None = None, head_class_ids: Sequence[int] | None = None) -> torch.Tensor:
    """Unnormalised single-scale CAMs at feature resolution: (B, K, h, w), ReLU applied.

    `images` (B, 3, H, W) normalised, on any device (moved to the model's).
    The model is put in eval mode for the call and restored afterwards."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a = model.features(images.to(_model_device(model)))
        idx = head_indices(class_ids, _num_outputs(model, a), head_class_ids)
        with torch.no_grad():
            return _maps_from_features(model, a, idx, method, closed_form)
    finally:
        model.train(was_training)


def class_activation_maps(
    model: nn.Module,
    image: torch.Tensor,
    class_ids: Sequence[int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    method: Method = "gradcam",
    normalize: Normalize = "per_class",
    closed_form: bool | None = None,
    head_class_ids: Sequence[int] | None = None,
    *,
    plain_cam_units: bool = True,
) -> CamResult:
    """Multi-scale (and flip) CAMs of one image for the given 1-based classes.

    `image` (3, H, W) normalised. One forward (plus one batched backward through
    the head when not in closed form) per scale for all classes; with `flip` the
    image and its mirror share the forward. `closed_form`: None = automatic
    (GAP + linear head), True = require it, False = always autograd.
    `head_class_ids[j]`: the class id of head output j (default j + 1).
    `plain_cam_units`: multiply each scale's map by its number of feature cells
    h*w before summing (see the module docstring); False sums the raw maps.
    Returns maps in [0, 1]: `cam` at (ceil(H/4), ceil(W/4)), `high_res` at (H, W).
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    if normalize not in ("per_class", "global"):
        raise ValueError(f"normalize must be 'per_class' or 'global', got {normalize!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(scales) == 0 or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
    keys = np.asarray([int(k) for k in class_ids], dtype=np.int64)
    height, width = int(image.shape[1]), int(image.shape[2])
    h4, w4 = stride4_size(height, width)
    k = len(keys)
    if k == 0:
        return CamResult(keys, [np.zeros((0, h4, w4), np.float32)], (height, width), normalize)

    device = _model_device(model)
    x = image.to(device=device, dtype=_model_dtype(model))[None]
    was_training = model.training
    model.eval()
    try:
        scale_maps: list[np.ndarray] = []
        idx: list[int] | None = None
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, size=scaled_size(height, width, s), mode="bilinear",
                                                  align_corners=False)
            if flip:
                xs = torch.cat([xs, xs.flip(-1)])
            with torch.no_grad():
                a = model.features(xs)
            if idx is None:
                idx = head_indices(keys.tolist(), _num_outputs(model, a), head_class_ids)
            with torch.no_grad():
                maps = _maps_from_features(model, a, idx, method, closed_form)  # (1 or 2, K, h, w)
                # bilinear resizing is linear and mirror-symmetric: summing the
                # un-flipped maps before upsampling equals summing after it
                m = maps[:1] + maps[1:].flip(-1) if flip else maps
                if plain_cam_units:
                    m = m * (a.shape[-2] * a.shape[-1])
                scale_maps.append(m[0].float().cpu().numpy())
        return CamResult(keys, scale_maps, (height, width), normalize)
    finally:
        model.train(was_training)
