"""Joint image + label-map augmentation: the image and its mask stay aligned
through rescale, flip and crop, and padding is the mean colour / 255."""

import numpy as np
import torch
from scipy import ndimage

from wsss_core.config import AugmentConfig
from wsss_core.data.transforms import JointTensors, joint_train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # not 0.5: undoing them must be right
BLOCK, HEIGHT, WIDTH, CROP = 12, 40, 96, 64
VOID = 255  # the label of padded pixels (VOC void)


def colour(labels):
    """The RGB colour (0..255 floats) that encodes each label 0..14: R = 10 l + 60, G = 250 - 10 l, B = 30."""
    labels = np.asarray(labels, np.float64)
    return np.stack([10.0 * labels + 60.0, 250.0 - 10.0 * labels, np.full(labels.shape, 30.0)], -1)


def test_joint_train_transform_keeps_image_and_mask_aligned():
    # label = x-block % 5 + 5 * (y-block % 3): 15 labels, not mirror-symmetric, and the image encodes it exactly
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    labels = ((xx // BLOCK) % 5 + 5 * ((yy // BLOCK) % 3)).astype(np.uint8)
    image = colour(labels).astype(np.uint8)
    assert np.array_equal(image[..., 0], 10 * labels + 60)
    augment = AugmentConfig(flip=True, scale_range=(0.5, 1.5), color_jitter=0.0)
    transform = joint_train_transform(CROP, augment, MEAN, STD)  # as the boundary and segmentation stages call it
    mean, std = np.array(MEAN), np.array(STD)
    flips, heights, compared = [], set(), 0
    for seed in range(16):
        x, y, index = JointTensors([(image, labels)], transform, seed)[0]
        assert index == 0 and x.shape == (3, CROP, CROP) and x.dtype == torch.float32
        assert y.shape == (CROP, CROP) and y.dtype == torch.int64
        m = y.numpy()
        real = m != VOID
        assert set(np.unique(m[real]).tolist()) <= set(range(15))
        # padding: the mean colour (0 after normalisation) in the image exactly where the mask is 255
        assert np.all(x.numpy()[:, ~real] == 0.0), seed
        # the height is never cropped (40 x 1.5 < 64): the visible rows give the scale, round(40 s)
        rows = np.flatnonzero(real.any(1))
        assert np.all(np.diff(rows) == 1) and 20 <= len(rows) <= 60
        heights.add(len(rows))
        # flipped or not, from the mask: left to right the x-block part of the label steps +1 (mod 5), or -1
        left, right = m[:, :-1], m[:, 1:]
        edge = (left != VOID) & (right != VOID) & (left % 5 != right % 5)
        steps = set(((right[edge] % 5 - left[edge] % 5) % 5).tolist())
        assert steps in ({1}, {4}), (seed, steps)
        flips.append(steps == {4})
        # every pixel's colour is its label's colour, except near label edges: the image is resized bilinearly
        # (antialiased when shrinking: a 2-pixel blend band at scale 0.5) and the mask with nearest, whose edges
        # may sit a pixel off the image's. So compare where the 5 x 5 window of the mask holds one label, and
        # not within 2 pixels of the crop's border (the image there may blend with pixels cropped away).
        rgb = (x.permute(1, 2, 0).numpy().astype(np.float64) * std + mean) * 255.0
        hi = ndimage.maximum_filter(m, size=5, mode="constant", cval=254)
        lo = ndimage.minimum_filter(m, size=5, mode="constant", cval=254)
        inside = real & (hi == lo)
        assert inside.sum() >= 0.1 * real.sum(), seed
        np.testing.assert_allclose(rgb[inside], colour(m[inside]), atol=1e-3, err_msg=f"seed {seed}")
        assert np.array_equal(np.rint((rgb[inside][:, 0] - 60.0) / 10.0), m[inside])
        compared += int(inside.sum())
    assert 4 <= sum(flips) <= 12, flips  # both outcomes occurred
    assert len(heights) >= 8 and min(heights) <= 30 and max(heights) >= 50, sorted(heights)  # several scales
    assert compared > 16 * CROP * CROP * 0.1
