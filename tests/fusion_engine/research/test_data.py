"""Data loading: case of a pair name, split by case, random crops of images and of pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusion_engine.errors import InputError
from fusion_engine.research.data import (
    case_of,
    list_pairs,
    load_pair_set,
    load_training_set,
    random_crop_batch,
    random_pair_crops,
)
from tests.fusion_engine.synthetic import make_pairs
from tests.peers import AANLIB


def test_case_is_the_name_without_the_slice_number() -> None:
    assert case_of("16003") == "16"
    assert case_of("2004") == "2"  # case 2, not case 20
    assert case_of("20004") == "20"
    for bad in ("004", "12a04", ""):
        with pytest.raises(InputError):
            case_of(bad)


def test_single_digit_cases_are_not_merged(tmp_path: Path) -> None:
    root = make_pairs(tmp_path, cases=("2", "20"), per_case=2)
    pairs = list_pairs(root / "aanlib-ct-mri", {"2"})
    assert [p.name for p in pairs] == ["2000", "2001"]
    assert {p.case for p in list_pairs(root / "aanlib-ct-mri")} == {"2", "20"}


def test_split_is_by_case(tmp_path: Path) -> None:
    root = make_pairs(tmp_path)
    ts = load_training_set(root, val_cases=("13",), use_phantom=False)
    assert len(ts.images) == 8 and len(ts.val_images) == 4
    assert all(n.startswith("13") for n in ts.val_names)
    assert {p.case for p in list_pairs(root / "aanlib-ct-mri")} == {"11", "12", "13"}


def test_random_crops_shape_and_seed(tmp_path: Path) -> None:
    ts = load_training_set(make_pairs(tmp_path), val_cases=("13",), use_phantom=False)
    a = random_crop_batch(ts, 3, 32, np.random.default_rng(5))
    b = random_crop_batch(ts, 3, 32, np.random.default_rng(5))
    big = random_crop_batch(ts, 1, 64, np.random.default_rng(5))  # larger than the images
    assert a.shape == (3, 1, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert big.shape == (1, 1, 64, 64)


def test_pair_crops_keep_ct_and_mr_aligned(tmp_path: Path) -> None:
    pairs = load_pair_set(make_pairs(tmp_path) / "aanlib-ct-mri", {"11", "12"})
    assert len(pairs) == 4 and pairs.ct.shape == (4, 48, 48)
    # make the MR a known function of the CT: any crop or flip must keep that relation
    pairs.mr[:] = 1.0 - pairs.ct
    ct, mr = random_pair_crops(pairs, 16, 24, np.random.default_rng(3))
    assert ct.shape == mr.shape == (16, 1, 24, 24)
    assert np.allclose(mr, 1.0 - ct)
    again, _ = random_pair_crops(pairs, 16, 24, np.random.default_rng(3))
    assert np.array_equal(ct, again)
    with pytest.raises(InputError):
        random_pair_crops(pairs, 1, 64, np.random.default_rng(3))
    with pytest.raises(InputError):
        load_pair_set(tmp_path / "aanlib-ct-mri", {"99"})


def test_real_aanlib_cases() -> None:
    if not (AANLIB / "CT").is_dir():
        pytest.skip(f"AANLIB pairs not present at {AANLIB}")
    cases = {p.case for p in list_pairs(AANLIB)}
    assert cases == {"2", "16", "20", "21", "28", "32", "33", "34"}
    assert len(list_pairs(AANLIB, {"21", "34"})) == 38
