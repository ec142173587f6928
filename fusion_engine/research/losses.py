"""Training losses: the autoencoder's reconstruction loss and the fusion stage's fusion loss.

There is no ground truth for a fused image, so the fusion loss says what a good one keeps of
its two sources (images in [0, 1], ``a`` = CT, ``b`` = MR, ``f`` = fused):

* **gradient** (edges): the L1 distance between the gradient of ``f`` and, per pixel, the
  gradient of the source whose gradient is stronger there (Sobel, both components, so the
  direction counts as well as the strength). Every edge of either source should appear in
  the fused image with its own strength and direction, whichever source it comes from; a
  weaker edge of the other source at the same place cannot be kept as well and is not asked
  for. This is the term that keeps bone edges from the CT and soft-tissue edges from the MR.
* **intensity** (contrast): the L1 distance to a saliency-weighted target
  ``w a + (1 - w) b`` with ``w = s_a^gamma / (s_a^gamma + s_b^gamma)``, ``s`` the 5 x 5 local
  mean of each source. Where one source is clearly brighter (bone in the CT, fat or fluid in
  the MR) its grey level is kept, where both are alike they are mixed; where both are dark
  the target is dark, so the air stays black. ``gamma`` sets how sharply the brighter source
  wins (``gamma`` -> infinity is the pixel maximum, ``gamma = 1`` a brightness-weighted mean).
* **SSIM** (structure): ``1 - mean(w SSIM(f, a) + (1 - w) SSIM(f, b))`` per pixel with the
  Gaussian 11 x 11 window and the same saliency weight ``w``: the local structure
  (correlation) and contrast of each source where that source is the salient one, on top of
  the two pixel-wise terms above; it also penalises ringing and checkerboard texture that
  neither source has. Weighting matters where the sources disagree: in the skull the CT is
  white and the MR dark, and an unweighted SSIM to both (``ssim_by_saliency=False``, the
  common choice) pulls the bone towards grey with bright rims, which we saw and rejected.

Gradients alone do not fix the absolute grey level and the intensity target alone would
reproduce the pixel maximum, which loses the weaker source's edges; together with SSIM they
ask for the brighter source's grey level with every edge of both. The weights are
:class:`FusionLossWeights`; ``docs/fusion_engine.md`` gives the reasons for their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SALIENCY_WINDOW = 5
"""Side of the box filter of the saliency (local mean brightness) of each source."""


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_torch(x: Tensor, y: Tensor, window: Tensor | None = None) -> Tensor:
    """Mean SSIM (Wang et al. 2004; Gaussian 11x11, sigma 1.5, data range 1) of (N,1,H,W)."""
    return ssim_map(x, y, window).mean()


def ssim_map(x: Tensor, y: Tensor, window: Tensor | None = None) -> Tensor:
    """Per-pixel SSIM of (N,1,H,W) images over the valid region, (N,1,H-10,W-10)."""
    w = _gaussian_window().to(x) if window is None else window
    c1, c2 = 0.01**2, 0.03**2
    mx = F.conv2d(x, w)
    my = F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx * mx
    syy = F.conv2d(y * y, w) - my * my
    sxy = F.conv2d(x * y, w) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return num / den


def recon_loss(out: Tensor, target: Tensor) -> Tensor:
    """The paper's autoencoder loss: (1 - SSIM) + MSE."""
    return (1.0 - ssim_torch(out, target)) + F.mse_loss(out, target)


_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4.0


def sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel derivatives (x, y) of (N, 1, H, W) images, scaled to unit gain, replicate border."""
    k = _SOBEL_X.to(x)[None, None]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, k), F.conv2d(padded, k.transpose(-1, -2))


def stronger_gradient(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per pixel the Sobel gradient (x, y) of the source whose gradient is stronger."""
    ax, ay = sobel(a)
    bx, by = sobel(b)
    pick_a = (ax * ax + ay * ay) >= (bx * bx + by * by)
    return torch.where(pick_a, ax, bx), torch.where(pick_a, ay, by)


def saliency_weight(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """``w = s_a^gamma / (s_a^gamma + s_b^gamma)``, s = the 5 x 5 local mean of each source."""
    pad = SALIENCY_WINDOW // 2
    sa = F.avg_pool2d(F.pad(a, (pad,) * 4, mode="replicate"), SALIENCY_WINDOW, 1)
    sb = F.avg_pool2d(F.pad(b, (pad,) * 4, mode="replicate"), SALIENCY_WINDOW, 1)
    pa, pb = sa.clamp_min(0) ** gamma, sb.clamp_min(0) ** gamma
    return pa / (pa + pb + 1e-6)


def saliency_target(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """``w a + (1 - w) b`` with the saliency weight ``w`` of :func:`saliency_weight`."""
    w = saliency_weight(a, b, gamma)
    return w * a + (1.0 - w) * b


def weighted_ssim(a: Tensor, b: Tensor, f: Tensor, w: Tensor) -> Tensor:
    """Mean of ``w SSIM(f, a) + (1 - w) SSIM(f, b)`` per pixel (``w`` cropped to the valid
    region of the 11 x 11 window)."""
    m = SSIM_WINDOW // 2
    wv = w[..., m:-m, m:-m]
    return (wv * ssim_map(f, a) + (1.0 - wv) * ssim_map(f, b)).mean()


@dataclass(frozen=True)
class FusionLossWeights:
    """Weights of the fusion loss's terms and the sharpness of the saliency weights."""

    gradient: float = 8.0
    intensity: float = 1.0
    ssim: float = 1.0
    gamma: float = 4.0
    ssim_by_saliency: bool = True


def fusion_loss_terms(
    a: Tensor, b: Tensor, f: Tensor, gamma: float, ssim_by_saliency: bool = True
) -> dict[str, Tensor]:
    """The three unweighted terms (see the module docstring), each a scalar."""
    tx, ty = stronger_gradient(a, b)
    fx, fy = sobel(f)
    w = saliency_weight(a, b, gamma)
    if ssim_by_saliency:
        ssim = weighted_ssim(a, b, f, w)
    else:
        ssim = 0.5 * (ssim_torch(f, a) + ssim_torch(f, b))
    return {
        "gradient": ((fx - tx).abs() + (fy - ty).abs()).mean(),
        "intensity": (f - (w * a + (1.0 - w) * b)).abs().mean(),
        "ssim": 1.0 - ssim,
    }


def fusion_loss(
    a: Tensor, b: Tensor, f: Tensor, weights: FusionLossWeights
) -> tuple[Tensor, dict[str, float]]:
    """The weighted fusion loss and its unweighted terms as floats (for the loss curves)."""
    terms = fusion_loss_terms(a, b, f, weights.gamma, weights.ssim_by_saliency)
    total = (
        weights.gradient * terms["gradient"]
        + weights.intensity * terms["intensity"]
        + weights.ssim * terms["ssim"]
    )
    return total, {k: float(v.detach()) for k, v in terms.items()}
