"""Training losses: reconstruction loss and the fusion loss's three terms."""

from __future__ import annotations

import pytest
import torch

from fusion_engine.research.losses import (
    FusionLossWeights,
    fusion_loss,
    fusion_loss_terms,
    recon_loss,
    saliency_target,
    sobel,
    ssim_torch,
    stronger_gradient,
)


def _disk(size: int = 32, r: float = 9.0, value: float = 0.8) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < r * r
    return (inside.float() * value)[None, None]


def test_reconstruction_loss_is_zero_for_identical_images() -> None:
    x = torch.rand(2, 1, 24, 24)
    assert float(ssim_torch(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(recon_loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(recon_loss(x, 1 - x)) > 0.5


def test_sobel_of_a_ramp() -> None:
    ramp = torch.arange(10.0).repeat(10, 1)[None, None] / 10  # rises 0.1 per column
    gx, gy = sobel(ramp)
    inner = (..., slice(1, -1), slice(1, -1))
    # the kernel [1 0 -1] rows: a rising ramp gives -2 * 0.1 * 4 / 4 = -0.2 at unit gain
    assert torch.allclose(gx[inner], torch.full_like(gx[inner], -0.2), atol=1e-6)
    assert torch.allclose(gy[inner], torch.zeros_like(gy[inner]), atol=1e-6)


def test_stronger_gradient_picks_the_source_with_the_edge() -> None:
    a = _disk(r=6.0)  # CT-like: small bright disk
    b = _disk(r=12.0, value=0.5)  # MR-like: larger, dimmer disk
    tx, ty = stronger_gradient(a, b)
    ax, ay = sobel(a)
    bx, by = sobel(b)
    on_a = (ax.abs() + ay.abs()) > 0.05
    on_b = (bx.abs() + by.abs()) > 0.05
    assert torch.equal(tx[on_a], ax[on_a]) and torch.equal(ty[on_a], ay[on_a])
    assert torch.equal(tx[on_b], bx[on_b]) and torch.equal(ty[on_b], by[on_b])


def test_saliency_target_keeps_the_brighter_source_and_black_air() -> None:
    a = _disk(r=6.0, value=1.0)
    b = _disk(r=12.0, value=0.4)
    t = saliency_target(a, b, gamma=4.0)
    assert float(t[0, 0, 16, 16]) > 0.95  # inside the bright CT disk: the CT
    assert float(t[0, 0, 16, 26]) == pytest.approx(0.4, abs=1e-3)  # MR only: the MR
    assert float(t[0, 0, 0, 0]) == 0.0  # both dark: black
    # gamma 1: a brightness-weighted mean, (1 * 1 + 0.4 * 0.4) / 1.4 at the CT disk's centre
    mixed = saliency_target(a, b, gamma=1.0)
    assert float(mixed[0, 0, 16, 16]) == pytest.approx(1.16 / 1.4, abs=1e-4)


def test_fusion_loss_prefers_keeping_both_sources() -> None:
    a = _disk(r=6.0, value=1.0)
    b = _disk(r=12.0, value=0.4)
    w = FusionLossWeights()
    good, terms = fusion_loss(a, b, torch.maximum(a, b), w)
    only_ct, _ = fusion_loss(a, b, a, w)
    grey, _ = fusion_loss(a, b, torch.full_like(a, 0.3), w)
    assert float(good) < float(only_ct) and float(good) < float(grey)
    assert set(terms) == {"gradient", "intensity", "ssim"}
    raised = fusion_loss_terms(a, b, torch.maximum(a, b) + 0.1, w.gamma)
    assert float(raised["intensity"]) > terms["intensity"] + 0.05  # raised background costs


def test_fusion_loss_has_gradients_for_the_fused_image() -> None:
    a, b = _disk(r=6.0), _disk(r=12.0, value=0.5)
    f = (0.5 * (a + b)).requires_grad_(True)
    loss, _ = fusion_loss(a, b, f, FusionLossWeights())
    loss.backward()  # type: ignore[no-untyped-call]
    assert f.grad is not None and float(f.grad.abs().sum()) > 0


def test_saliency_weighted_ssim_keeps_bone_white() -> None:
    """Where the CT is bright and the MR dark (bone), SSIM to both with equal weights hardly
    minds a grey bone; weighted by saliency it clearly prefers the CT's white."""
    a = _disk(r=10.0, value=1.0) - _disk(r=7.0, value=1.0)  # a white ring: skull in the CT
    b = _disk(r=7.0, value=0.6)  # MR: dark bone, brain inside

    def gap(by_saliency: bool) -> float:
        white, grey = (torch.where(a > 0.5, torch.full_like(a, v), b) for v in (1.0, 0.55))
        terms = [fusion_loss_terms(a, b, f, 4.0, by_saliency)["ssim"] for f in (grey, white)]
        return float(terms[0] - terms[1])

    assert gap(True) > 0.03
    assert gap(True) > 5 * gap(False)
