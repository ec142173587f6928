"""CPU forward pass of :class:`~fusion_engine.model.FusionNet` with oneDNN fused operators.

The eager network spends more than half of its CPU time outside the convolutions: a
reflect-padded copy of every activation before each 3x3 convolution, a separate ReLU pass
after it, and the Res2Net residual sum. This module computes the same function with fewer
memory passes:

* each convolution runs with oneDNN's built-in zero padding and the ReLU as a fused post-op
  (``mkldnn::_convolution_pointwise``, the operator torch's own compiler emits on CPU);
* the one-pixel output ring, the only place where zero and reflect padding differ, is then
  recomputed exactly from four thin reflect-padded strips;
* the Res2Net output convolution adds the shortcut and applies the ReLU in the same kernel.

The result equals the eager network's up to floating-point summation order (the tests check
it). :func:`available` says whether this torch build has the operators; callers fall back to
the eager network otherwise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_engine.model import (
    Extractor,
    FusionFn,
    FusionLayer,
    FusionNet,
    Reconstructor,
    Res2NetBlock,
    mix_by_gains,
)

_NO_SCALARS: list[float] = []


@functools.cache
def available() -> bool:
    """True when this torch build offers oneDNN's fused convolution operators."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    try:
        ops = torch.ops.mkldnn
        return hasattr(ops, "_convolution_pointwise") and hasattr(
            ops._convolution_pointwise, "binary"
        )
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def bf16_supported() -> bool:
    """True when oneDNN runs bf16 convolutions natively on this CPU (AVX512 or AMX).

    Without it torch still computes bf16 convolutions, but through a reference loop more
    than ten times slower than float32, so callers should not choose bf16 then.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _conv(x: Tensor, conv: nn.Conv2d, *, relu: bool, padding: int) -> Tensor:
    """oneDNN convolution with zero padding and an optional fused ReLU."""
    out: Tensor = torch.ops.mkldnn._convolution_pointwise(
        x,
        conv.weight,
        conv.bias,
        [padding, padding],
        [1, 1],
        [1, 1],
        1,
        "relu" if relu else "none",
        _NO_SCALARS,
        "",
    )
    return out


def conv3_reflect(x: Tensor, conv: nn.Conv2d, *, relu: bool) -> Tensor:
    """3x3 convolution with reflect padding (as ``conv``), optionally followed by ReLU.

    Computed as a zero-padded convolution whose border ring is then replaced by the
    convolution of reflect-padded one-pixel strips: exact for any size >= 2 x 2.
    """
    h, w = x.shape[-2:]
    y = _conv(x, conv, relu=relu, padding=1)
    top = F.pad(x[..., 0:2, :], (1, 1, 1, 0), mode="reflect")
    bottom = F.pad(x[..., h - 2 : h, :], (1, 1, 0, 1), mode="reflect")
    left = F.pad(x[..., :, 0:2], (1, 0, 1, 1), mode="reflect")
    right = F.pad(x[..., :, w - 2 : w], (0, 1, 1, 1), mode="reflect")
    y[..., 0:1, :] = _conv(top, conv, relu=relu, padding=0)
    y[..., h - 1 : h, :] = _conv(bottom, conv, relu=relu, padding=0)
    y[..., :, 0:1] = _conv(left, conv, relu=relu, padding=0)
    y[..., :, w - 1 : w] = _conv(right, conv, relu=relu, padding=0)
    return y


def _res2net(block: Res2NetBlock, x: Tensor) -> Tensor:
    out = _conv(x, block.conv_in, relu=True, padding=0)
    xs = torch.split(out, block.width, dim=1)
    ys = [xs[0]]
    prev: Tensor | None = None
    for i, branch in enumerate(block.branches, start=1):
        # a channel slice of an NHWC tensor is strided; adding it to a dense tensor is
        # about three times slower than copying it dense first and then adding
        xi = xs[i].contiguous(memory_format=torch.channels_last)
        inp = xi if prev is None else xi.add_(prev)
        first, second = branch[0], branch[2]  # type: ignore[index]
        if not isinstance(first, nn.Conv2d) or not isinstance(second, nn.Conv2d):
            raise TypeError("unexpected Res2Net branch layout")
        prev = conv3_reflect(conv3_reflect(inp, first, relu=True), second, relu=True)
        ys.append(prev)
    cat = torch.cat(ys, dim=1)
    conv = block.conv_out
    fused: Tensor = torch.ops.mkldnn._convolution_pointwise.binary(
        cat,
        x,
        conv.weight,
        conv.bias,
        [0, 0],
        [1, 1],
        [1, 1],
        1,
        "add",
        1.0,
        "relu",
        _NO_SCALARS,
        "",
    )
    return fused


def extract(ext: Extractor, x: Tensor) -> Tensor:
    """The extractor's forward pass with fused operators."""
    x = conv3_reflect(x, ext.conv1, relu=True)
    x = conv3_reflect(x, ext.conv2, relu=True)
    return _res2net(ext.res2net, x)


def reconstruct(rec: Reconstructor, x: Tensor) -> Tensor:
    """The reconstructor's forward pass with fused operators."""
    x = conv3_reflect(x, rec.conv1, relu=True)
    x = conv3_reflect(x, rec.conv2, relu=True)
    x = conv3_reflect(x, rec.conv3, relu=True)
    return conv3_reflect(x, rec.conv4, relu=False)


def fusion_layer(layer: FusionLayer, a: Tensor, b: Tensor) -> Tensor:
    """The learned fusion layer's forward pass with fused operators."""
    h = _conv(torch.cat([a, b], dim=1), layer.squeeze, relu=True, padding=0)
    h = conv3_reflect(h, layer.context, relu=True)
    return mix_by_gains(_conv(h, layer.gains, relu=False, padding=0), a, b)


def fuse(
    net: FusionNet,
    a: Tensor,
    b: Tensor,
    fusion: FusionFn,
    reconstructor: Reconstructor | None = None,
) -> Tensor:
    """Same as ``net.fuse(a, b, fusion, reconstructor)`` on CPU, with fused operators."""
    n = a.shape[0]
    feats = extract(net.extractor, torch.cat([a, b], dim=0))
    fa, fb = feats[:n], feats[n:]
    fused = fusion_layer(fusion, fa, fb) if isinstance(fusion, FusionLayer) else fusion(fa, fb)
    return reconstruct(reconstructor or net.reconstructor, fused)
