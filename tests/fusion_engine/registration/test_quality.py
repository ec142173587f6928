"""The reliability check: correct results pass, misregistrations, a mirrored MR and MRs of
another subject are refused, with the evidence named.

Negative cases follow the validation suite (docs/registration.md): a correct result perturbed
by 5 mm and by 5 degrees, the MR mirrored left-right, a synthetic head (another subject), and
noise. The full set (3, 5, 10 and 20 mm or degrees on every positive case, deformed subjects,
AANLIB human MR) runs in ``benchmarks/registration.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fusion_engine.errors import RegistrationError, UnreliableRegistrationError
from fusion_engine.registration import RegistrationResult, api, register
from fusion_engine.registration.pair import Pair
from tests.fusion_engine.registration import cases, synth

THREADS = 2

T2_AXIAL = cases.CaseSpec(
    "t2-axial-5mm",
    cases.Acquisition("axial-2d-5mm", "axial", 2.0, 5.0),
    "T2",
    degrees=15.0,
    axis=(0.2, -0.5, 0.84),
    shift_mm=(-12.0, 18.0, 25.0),
    seed=11,
)


@pytest.fixture(scope="module")
def registered(source: cases.Source) -> tuple[cases.Case, RegistrationResult, Pair]:
    """A correct registration of a T2-like case, and the pair prepared for checks."""
    case = source.build(T2_AXIAL)
    result = register(source.ct, case.moving, threads=THREADS)
    return case, result, api.prepare_pair(source.ct, case.moving, THREADS)


def _failed(exc: UnreliableRegistrationError) -> set[str]:
    quality = exc.quality
    assert not quality.reliable
    return {c.name for c in getattr(quality, "checks", []) if not c.passed}


@pytest.mark.slow
def test_correct_result_passes_the_check_again(
    registered: tuple[cases.Case, RegistrationResult, Pair],
) -> None:
    _, result, pair = registered
    quality = api.check_pair(pair, result.transform)
    assert quality.reliable, quality.summary()
    assert quality.checks[0].name == "optimum" and quality.checks[0].value < 0.5


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "amount"), [("mm", 5.0), ("deg", 5.0)])
def test_perturbed_result_is_flagged(
    source: cases.Source,
    registered: tuple[cases.Case, RegistrationResult, Pair],
    kind: str,
    amount: float,
) -> None:
    case, result, pair = registered
    moved = cases.perturbed(result.transform, kind, amount, source.center, seed=int(amount))
    error = cases.tre(moved, case.truth, source.head, case.moving)
    assert error.mean_mm > 3.0
    quality = api.check_pair(pair, moved)
    assert not quality.reliable
    optimum = next(c for c in quality.checks if c.name == "optimum")
    assert not optimum.passed and optimum.value > 3.0
    assert "not where the images fit best" in " ".join(quality.reasons)


@pytest.mark.slow
def test_mirrored_mr_is_refused(source: cases.Source) -> None:
    """A left-right flip: no rigid transform can be right, and the mirror pose fits better."""
    case = source.build(T2_AXIAL)
    with pytest.raises(UnreliableRegistrationError) as info:
        register(source.ct, synth.mirrored(case.moving), threads=THREADS)
    assert "mirror" in _failed(info.value)
    assert "flipped left-right" in str(info.value)


@pytest.mark.slow
def test_other_subject_is_refused(source: cases.Source) -> None:
    """A synthetic head (nested ellipsoids) against the porcine CT: the wrong subject."""
    grid = synth.Grid(np.eye(3), 2.0, 4.0, (240.0, 240.0, 220.0), np.array(source.center))
    with pytest.raises(UnreliableRegistrationError) as info:
        register(source.ct, synth.ellipsoid_head(grid, synth.T2), threads=THREADS)
    assert _failed(info.value)


@pytest.mark.slow
def test_noise_is_refused_and_can_be_accepted(source: cases.Source) -> None:
    grid = synth.Grid(np.eye(3), 4.0, 5.0, (256.0, 256.0, 220.0), np.array(source.center))
    image = grid.image()
    shape = sitk.GetArrayViewFromImage(image).shape
    noise = sitk.GetImageFromArray(np.random.default_rng(0).normal(100.0, 20.0, shape))
    noise.CopyInformation(image)
    with pytest.raises(UnreliableRegistrationError) as info:
        register(source.ct, noise, threads=THREADS)
    assert "unreliable" in str(info.value)
    accepted = register(source.ct, noise, threads=THREADS, accept_unreliable=True)
    assert not accepted.quality.reliable
    assert any("unreliable" in w for w in accepted.quality.warnings)


def test_constant_mr_cannot_register(small_pair: tuple[sitk.Image, sitk.Image]) -> None:
    ct, mr = small_pair
    flat = sitk.Image(mr.GetSize(), sitk.sitkFloat32)
    flat.CopyInformation(mr)
    with pytest.raises(RegistrationError) as info:
        register(ct, flat, threads=THREADS)
    assert not isinstance(info.value, UnreliableRegistrationError)
