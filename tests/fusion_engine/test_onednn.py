"""The oneDNN fused-operator CPU path computes the same function as the eager network."""

from __future__ import annotations

import pytest
import torch

from fusion_engine import onednn
from fusion_engine.inference import load_model
from fusion_engine.model import STRATEGY_NAMES

pytestmark = pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("h", "w"), [(2, 2), (3, 5), (37, 41), (64, 48)])
def test_extractor_and_reconstructor_match_eager(h: int, w: int) -> None:
    net = load_model("cpu", "channels_last").net
    x = _nhwc(torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(h * w)))
    with torch.inference_mode():
        feats_ref = net.extractor(x)
        feats = onednn.extract(net.extractor, x)
        assert feats.shape == feats_ref.shape
        assert torch.allclose(feats, feats_ref, atol=1e-4, rtol=1e-4)
        out_ref = net.reconstructor(feats_ref)
        out = onednn.reconstruct(net.reconstructor, feats_ref)
        assert torch.allclose(out, out_ref, atol=1e-5, rtol=1e-4)


def test_border_ring_is_reflect_not_zero_padding() -> None:
    # a bright image: zero padding would darken the first convolution's border ring
    conv = load_model("cpu", "channels_last").net.extractor.conv1
    x = _nhwc(torch.ones(1, 1, 9, 9))
    with torch.inference_mode():
        ref = conv(x).relu()
        out = onednn.conv3_reflect(x, conv, relu=True)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(out[..., 0, :], out[..., 4, :], atol=1e-6)  # constant image


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_fuse_matches_eager_for_every_strategy(strategy: str) -> None:
    model = load_model("cpu", "channels_last")
    assert model.fused_ops
    g = torch.Generator().manual_seed(7)
    # smooth images: no exact ties between the sources' activities
    a = _nhwc(torch.nn.functional.avg_pool2d(torch.rand(1, 1, 52, 60, generator=g), 5, 1, 2))
    b = _nhwc(torch.nn.functional.avg_pool2d(torch.rand(1, 1, 52, 60, generator=g), 5, 1, 2))
    fusion, reconstructor = model.net.path(strategy)
    with torch.inference_mode():
        ref = model.net.fuse(a, b, fusion, reconstructor)
        out = onednn.fuse(model.net, a, b, fusion, reconstructor)
    assert torch.allclose(out, ref, atol=1e-4)


def test_learned_fusion_layer_matches_eager() -> None:
    layer = load_model("cpu", "channels_last").net.stage.layer
    g = torch.Generator().manual_seed(11)
    a = _nhwc(torch.rand(2, 64, 19, 23, generator=g))
    b = _nhwc(torch.rand(2, 64, 19, 23, generator=g))
    with torch.inference_mode():
        assert torch.allclose(onednn.fusion_layer(layer, a, b), layer(a, b), atol=1e-5)


def test_reference_precision_stays_eager() -> None:
    assert not load_model("cpu", "fp32").fused_ops
