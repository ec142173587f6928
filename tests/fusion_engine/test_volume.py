"""fuse_volume: settings object and keyword overrides, the outside-MR policy, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fusion_engine.errors import InputError
from fusion_engine.intensity import ct_to_unit
from fusion_engine.model import LEARNED_STRATEGY
from fusion_engine.volume import VolumeFusionSettings, fuse_volume


def _volumes() -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    zz, yy, xx = np.mgrid[0:4, 0:48, 0:48]
    inside = (yy - 24) ** 2 + (xx - 24) ** 2 < (10 + 2 * zz) ** 2
    rng = np.random.default_rng(4)
    ct = np.where(inside, rng.uniform(-100, 900, inside.shape), -1000).astype(np.float32)
    mr = np.where(inside, rng.uniform(100, 900, inside.shape), 0).astype(np.float32)
    mask = np.zeros(inside.shape, np.uint8)
    mask[1:, :, 12:] = 1  # slice 0 and the left columns have no MR data
    images = []
    for arr in (ct, mr, mask):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.5, 0.5, 2.0))
        images.append(img)
    return images[0], images[1], images[2]


def test_settings_object_and_keywords_agree() -> None:
    images = _volumes()
    by_settings = fuse_volume(*images, VolumeFusionSettings(strategy="average", device="cpu"))
    by_keywords = fuse_volume(*images, strategy="average", device="cpu")
    a, b = sitk.GetArrayFromImage(by_settings), sitk.GetArrayFromImage(by_keywords)
    np.testing.assert_array_equal(a, b)
    # a keyword overrides the settings object's field
    other = fuse_volume(*images, VolumeFusionSettings(strategy="average"), strategy="addition")
    assert not np.allclose(sitk.GetArrayFromImage(other), a)
    window = fuse_volume(*images, VolumeFusionSettings(strategy="average", ct_window=(50, 150)))
    assert not np.allclose(sitk.GetArrayFromImage(window), a)


def test_learned_stage_keeps_the_ct_window_outside_the_mr() -> None:
    images = _volumes()
    out = sitk.GetArrayFromImage(fuse_volume(*images, strategy=LEARNED_STRATEGY, device="cpu"))
    ct = sitk.GetArrayFromImage(images[0])
    outside = sitk.GetArrayFromImage(images[2]) == 0
    np.testing.assert_array_equal(out[outside], ct_to_unit(ct)[outside])
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    assert not np.allclose(out[~outside], ct_to_unit(ct)[~outside], atol=1e-3)


def test_bad_settings_and_grids() -> None:
    images = _volumes()
    with pytest.raises(InputError, match="batch_size"):
        fuse_volume(*images, VolumeFusionSettings(batch_size=0))
    moved = sitk.Image(images[1])
    moved.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(InputError, match="one grid"):
        fuse_volume(images[0], moved, images[2])
    with pytest.raises(InputError, match="slice indices"):
        fuse_volume(*images, slices=[9])
