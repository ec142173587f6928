"""The Res2Net fusion network of Chen et al. (2024): extractor, fusion layer, reconstructor.

No I/O here. Every 3x3 convolution uses reflect padding, so borders stay clean and any
image size >= 2x2 works. ReLU follows every convolution except the reconstructor's last.

Layout (Table 1 of the paper):

* extractor: Conv3 1->32, Conv3 32->64, Res2Net block
  (Conv1 64->64, split into 4 groups of 16 channels, y1 = x1, y2 = H2(x2),
  yi = Hi(xi + y(i-1)), each Hi two Conv3 16->16, concatenate, Conv1 64->64, plus the
  module's identity shortcut after Gao et al.; ReLU after the sum);
* fusion layer: a strategy from :data:`FUSION_STRATEGIES` combining the two feature maps;
* reconstructor: Conv3 64->64->32->16->1.

The second training stage (:class:`FusionStage`, strategy :data:`LEARNED_STRATEGY`) replaces
the hand-made rule by a small learned fusion layer and uses its own fine-tuned copy of the
reconstructor; the extractor is shared and unchanged, so every hand-made rule keeps the
paper's autoencoder as it was trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_engine.defaults import DEFAULT_STRATEGY, LEARNED_STRATEGY

EPS = 1e-8
"""Small epsilon of the attention weights (paper eq. 3)."""


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, padding_mode="reflect")


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


class Res2NetBlock(nn.Module):
    """Res2Net module (Gao et al. 2019) with scale 4 and an identity shortcut."""

    def __init__(self, channels: int = 64, scale: int = 4) -> None:
        super().__init__()
        if channels % scale:
            raise ValueError("channels must be divisible by scale")
        self.scale = scale
        self.width = channels // scale
        self.conv_in = _conv1(channels, channels)
        self.branches = nn.ModuleList(
            nn.Sequential(
                _conv3(self.width, self.width),
                nn.ReLU(inplace=True),
                _conv3(self.width, self.width),
                nn.ReLU(inplace=True),
            )
            for _ in range(scale - 1)
        )
        self.conv_out = _conv1(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to (N, C, H, W) features."""
        out = F.relu(self.conv_in(x))
        xs = torch.split(out, self.width, dim=1)
        ys = [xs[0]]
        prev: Tensor | None = None
        for i, branch in enumerate(self.branches, start=1):
            inp = xs[i] if prev is None else xs[i] + prev
            prev = branch(inp)
            ys.append(prev)
        out = self.conv_out(torch.cat(ys, dim=1))
        return F.relu(out + x)


class Extractor(nn.Module):
    """Feature extractor: Conv3 1->32, Conv3 32->64, Res2Net block (64 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv3(1, 32)
        self.conv2 = _conv3(32, 64)
        self.res2net = Res2NetBlock(64, 4)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) image -> (N, 64, H, W) features."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        out: Tensor = self.res2net(x)
        return out


class Reconstructor(nn.Module):
    """Reconstructor: Conv3 64->64->32->16->1, no activation after the last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv3(64, 64)
        self.conv2 = _conv3(64, 32)
        self.conv3 = _conv3(32, 16)
        self.conv4 = _conv3(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 64, H, W) features -> (N, 1, H, W) image."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        out: Tensor = self.conv4(x)
        return out


# ---------------------------------------------------------------- fusion strategies

FusionFn = Callable[[Tensor, Tensor], Tensor]


def channel_mean(x: Tensor) -> Tensor:
    """Per-pixel mean over the channels, (N, C, H, W) -> (N, 1, H, W).

    A sum divided by C: ``Tensor.mean`` upcasts bf16 input to a float32 copy first, which
    costs more than the reduction itself.
    """
    return x.sum(dim=1, keepdim=True) / x.shape[1]


def mean_attention(a: Tensor, b: Tensor) -> Tensor:
    """Spatial mean attention (paper eqs. 2-3): weights Q_i / sum Q, Q = channel mean."""
    qa = channel_mean(a)
    qb = channel_mean(b)
    total = qa + qb + EPS
    return (qa / total) * a + (qb / total) * b


def sharpened_mean_attention(gamma: float) -> FusionFn:
    """Mean attention with sharpened weights: omega_i = Q_i^gamma / sum_j Q_j^gamma.

    ``gamma = 1`` is the paper's rule; larger values move towards choosing, per pixel, the
    features of the source with the larger channel mean; ``gamma = inf`` chooses outright
    (ties go to the first source). Computed as a softmax of ``gamma * log(Q + eps)`` so that
    large exponents do not underflow.
    """
    if not gamma > 0:
        raise ValueError("gamma must be > 0")

    def fuse(a: Tensor, b: Tensor) -> Tensor:
        qa = channel_mean(a)
        qb = channel_mean(b)
        if math.isinf(gamma):
            return torch.where(qa >= qb, a, b)
        logits = torch.cat([torch.log(qa + EPS), torch.log(qb + EPS)], dim=1) * gamma
        w = torch.softmax(logits, dim=1)
        return w[:, 0:1] * a + w[:, 1:2] * b

    fuse.__name__ = f"sharpened_mean_attention_{gamma:g}"
    fuse.__doc__ = f"Mean attention with weights Q_i^{gamma:g} / sum Q^{gamma:g}."
    return fuse


def selective_mean_attention(share: float) -> FusionFn:
    """Choose-max mean attention: per pixel the source with the larger channel mean Q keeps
    weight 1, the other keeps ``share`` of its features (``share = 0``: choose outright,
    the limit gamma -> inf of :func:`sharpened_mean_attention`). Ties go to the first source.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError("share must lie in [0, 1]")

    def fuse(a: Tensor, b: Tensor) -> Tensor:
        pick_a = channel_mean(a) >= channel_mean(b)
        if share == 0.0:
            return torch.where(pick_a, a, b)
        return torch.where(pick_a, a + share * b, b + share * a)

    fuse.__name__ = f"selective_mean_attention_{share:g}"
    fuse.__doc__ = f"Choose-max mean attention, the weaker source weighted {share:g}."
    return fuse


def softmax_mean(a: Tensor, b: Tensor) -> Tensor:
    """Softmax over the sources of the channel-mean activity Q."""
    q = torch.cat([channel_mean(a), channel_mean(b)], dim=1)
    w = torch.softmax(q, dim=1)
    return w[:, 0:1] * a + w[:, 1:2] * b


def addition(a: Tensor, b: Tensor) -> Tensor:
    """DenseFuse addition strategy: element-wise sum of the feature maps."""
    return a + b


def l1_norm(a: Tensor, b: Tensor) -> Tensor:
    """DenseFuse l1-norm strategy: channel l1 activity, 3x3 block average, ratio weights."""
    ca = a.abs().sum(dim=1, keepdim=True)
    cb = b.abs().sum(dim=1, keepdim=True)
    ca = F.avg_pool2d(F.pad(ca, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    cb = F.avg_pool2d(F.pad(cb, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    total = ca + cb + EPS
    return (ca / total) * a + (cb / total) * b


def average(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise mean of the feature maps."""
    return 0.5 * (a + b)


DEFAULT_SHARE = 0.0
"""Weight of the weaker source in ``mean-attention`` (chosen on training-case pairs)."""

FUSION_STRATEGIES: dict[str, FusionFn] = {
    "mean-attention": selective_mean_attention(DEFAULT_SHARE),
    "mean-attention-paper": mean_attention,
    "softmax-mean": softmax_mean,
    "addition": addition,
    "l1-norm": l1_norm,
    "average": average,
}
"""Hand-made fusion rules by name, in the order of reports (they have no weights).

``mean-attention`` is the paper's spatial mean attention with sharpened weights (choose, per
pixel, the source with the larger channel mean); ``mean-attention-paper`` is eqs. 2-3 exactly.
The learned rule, :data:`LEARNED_STRATEGY`, is not in this table: it has weights of its own.
"""

FUSION_HIDDEN = 32
"""Channels of the learned fusion layer's hidden maps (its cost: see :class:`FusionLayer`)."""


class FusionLayer(nn.Module):
    """Learned fusion layer: per pixel and per channel, a gain in (0, 2) for each source.

    ``fused = g_a * a + g_b * b`` with ``(g_a, g_b) = 2 * sigmoid(W3 relu(W2 relu(W1 [a, b])))``:
    W1 a 1x1 convolution 128 -> 32 (sees both sources' features at once), W2 a 3x3
    convolution 32 -> 32 (a pixel's neighbourhood decides, so the choice does not flip from
    pixel to pixel), W3 a 1x1 convolution 32 -> 128. Gains rather than free features keep the
    result a mixture of the two sources' own features, which the reconstructor knows how to
    decode: it can choose one source (1, 0), add both (1, 1) or raise a weak contrast (up to
    2). 17 408 multiply-adds per pixel, 12 % of the network's 141 520. The last layer starts at
    zero, so training starts from the gains (1, 1), the ``addition`` rule.
    """

    def __init__(self, channels: int = 64, hidden: int = FUSION_HIDDEN) -> None:
        super().__init__()
        self.squeeze = _conv1(2 * channels, hidden)
        self.context = _conv3(hidden, hidden)
        self.gains = _conv1(hidden, 2 * channels)
        with torch.no_grad():
            self.gains.weight.zero_()
            self.gains.bias.zero_()  # type: ignore[union-attr]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Fuse two (N, 64, H, W) feature maps into one."""
        h = F.relu(self.squeeze(torch.cat([a, b], dim=1)))
        h = F.relu(self.context(h))
        return mix_by_gains(self.gains(h), a, b)


def mix_by_gains(logits: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``2 sigmoid(logits)`` split into the gains of ``a`` and ``b``; their weighted sum."""
    g = 2.0 * torch.sigmoid(logits)
    ga, gb = torch.split(g, a.shape[1], dim=1)
    return ga * a + gb * b


class FusionStage(nn.Module):
    """The second training stage: learned fusion layer plus a fine-tuned reconstructor."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = FusionLayer()
        self.reconstructor = Reconstructor()


class FusionNet(nn.Module):
    """Extractor + fusion layer + reconstructor; one shared extractor for both sources.

    ``stage`` holds the learned fusion stage; the hand-made rules use ``reconstructor``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.extractor = Extractor()
        self.reconstructor = Reconstructor()
        self.stage = FusionStage()

    def autoencode(self, x: Tensor) -> Tensor:
        """Training path without fusion layer: (N, 1, H, W) -> (N, 1, H, W)."""
        out: Tensor = self.reconstructor(self.extractor(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Alias of :meth:`autoencode`."""
        return self.autoencode(x)

    def path(self, strategy: str) -> tuple[FusionFn, Reconstructor]:
        """The fusion function and the reconstructor of a strategy name."""
        if strategy == LEARNED_STRATEGY:
            return self.stage.layer, self.stage.reconstructor
        try:
            return FUSION_STRATEGIES[strategy], self.reconstructor
        except KeyError:
            raise ValueError(f"unknown strategy {strategy!r}") from None

    def fuse(
        self, a: Tensor, b: Tensor, fusion: FusionFn, reconstructor: Reconstructor | None = None
    ) -> Tensor:
        """Fuse two (N, 1, H, W) images with a fusion function over their features.

        Both sources go through the extractor in one batch; ``reconstructor`` defaults to the
        autoencoder's (:meth:`path` gives a strategy's pair).
        """
        n = a.shape[0]
        feats = self.extractor(torch.cat([a, b], dim=0))
        fused = fusion(feats[:n], feats[n:])
        out: Tensor = (reconstructor or self.reconstructor)(fused)
        return out

    def fuse_with(self, a: Tensor, b: Tensor, strategy: str) -> Tensor:
        """Fuse two (N, 1, H, W) images with the named strategy."""
        fusion, reconstructor = self.path(strategy)
        return self.fuse(a, b, fusion, reconstructor)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def conv_macs(module: nn.Module) -> int:
    """Multiply-adds per output pixel of all convolutions of a module."""
    total = 0
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += mod.in_channels * mod.out_channels * kh * kw // mod.groups
    return total


def macs_per_pixel(model: FusionNet) -> tuple[int, int]:
    """Multiply-adds per pixel of (one extractor, the reconstructor), convolutions only."""
    return conv_macs(model.extractor), conv_macs(model.reconstructor)


def fusion_macs_per_pixel(model: FusionNet, strategy: str) -> int:
    """Multiply-adds per pixel of one fusion with ``strategy``: two extractors, the fusion
    layer's convolutions (none for a hand-made rule) and the reconstructor."""
    fusion, reconstructor = model.path(strategy)
    layer = conv_macs(fusion) if isinstance(fusion, nn.Module) else 0
    return 2 * conv_macs(model.extractor) + layer + conv_macs(reconstructor)


STRATEGY_NAMES: tuple[str, ...] = (
    DEFAULT_STRATEGY,
    *(name for name in (LEARNED_STRATEGY, *FUSION_STRATEGIES) if name != DEFAULT_STRATEGY),
)
"""Every strategy name: the default first, then the learned stage and the hand-made rules."""
