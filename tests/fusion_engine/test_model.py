"""The Res2Net fusion network: architecture, padding, fusion strategies."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusion_engine.defaults import DEFAULT_STRATEGY
from fusion_engine.model import (
    FUSION_STRATEGIES,
    LEARNED_STRATEGY,
    STRATEGY_NAMES,
    FusionLayer,
    FusionNet,
    Res2NetBlock,
    addition,
    average,
    count_parameters,
    fusion_macs_per_pixel,
    l1_norm,
    macs_per_pixel,
    mean_attention,
    selective_mean_attention,
    sharpened_mean_attention,
    softmax_mean,
)


def test_parameter_count_and_macs_match_table_1() -> None:
    net = FusionNet()
    # conv 1->32, 32->64, Res2Net (1x1 64->64, 3 x two 3x3 16->16, 1x1 64->64),
    # reconstructor 64->64->32->16->1, all with biases
    assert count_parameters(net.extractor) + count_parameters(net.reconstructor) == 101_217
    assert macs_per_pixel(net) == (40_736, 60_048)


def test_learned_stage_cost_within_the_budget() -> None:
    net = FusionNet()
    # fusion layer 1x1 128->32, 3x3 32->32, 1x1 32->128 and a second reconstructor
    assert count_parameters(net.stage.layer) == 4_128 + 9_248 + 4_224
    assert count_parameters(net.stage) == 17_600 + 60_161
    hand = fusion_macs_per_pixel(net, "mean-attention")
    learned = fusion_macs_per_pixel(net, LEARNED_STRATEGY)
    assert hand == 2 * 40_736 + 60_048
    assert learned == hand + 4_096 + 9_216 + 4_096
    assert learned <= 1.2 * hand  # the cap: at most 20 % more multiply-adds
    # fp32 weights of the whole network under 1 MB
    assert 4 * count_parameters(net) < 1_000_000


def test_every_3x3_conv_uses_reflect_padding() -> None:
    convs = [m for m in FusionNet().modules() if isinstance(m, nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    assert len(three) == 2 + 6 + 4 + 1 + 4
    assert all(c.padding_mode == "reflect" and c.padding == (1, 1) for c in three)


def test_res2net_block_structure_and_identity_shortcut() -> None:
    block = Res2NetBlock(64, 4)
    assert block.width == 16 and len(block.branches) == 3
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    x = torch.rand(1, 64, 5, 6)
    # with all weights zero only the identity shortcut remains (ReLU of a non-negative input)
    assert torch.equal(block(x), x)


def test_res2net_hierarchy_first_group_bypasses_convs() -> None:
    torch.manual_seed(0)
    block = Res2NetBlock(64, 4).eval()
    x = torch.rand(1, 64, 6, 6)
    seen: list[torch.Tensor] = []
    block.branches[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    block.branches[1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        block(x)
        inner = torch.relu(block.conv_in(x))
        x2, x3 = inner[:, 16:32], inner[:, 32:48]
        y2 = block.branches[0](x2)
    assert torch.allclose(seen[0], x2)
    assert torch.allclose(seen[1], x3 + y2)  # y3 = H3(x3 + y2)


@pytest.mark.parametrize("shape", [(17, 23), (2, 2), (64, 40)])
def test_any_image_size(shape: tuple[int, int]) -> None:
    net = FusionNet().eval()
    x = torch.rand(2, 1, *shape)
    with torch.no_grad():
        assert net.autoencode(x).shape == x.shape
        for fn in FUSION_STRATEGIES.values():
            assert net.fuse(x, x.flip(0), fn).shape == x.shape
        assert net.fuse_with(x, x.flip(0), LEARNED_STRATEGY).shape == x.shape


def test_reflect_padding_keeps_constant_image_flat() -> None:
    # with reflect padding a constant input gives a constant output (zero padding would not)
    torch.manual_seed(1)
    net = FusionNet().eval()
    with torch.no_grad():
        out = net.autoencode(torch.full((1, 1, 12, 12), 0.4))
    assert float(out.max() - out.min()) < 1e-5


def test_mean_attention_weights() -> None:
    a = torch.full((1, 4, 3, 3), 2.0)
    b = torch.full((1, 4, 3, 3), 1.0)
    out = mean_attention(a, b)
    # Q_a = 2, Q_b = 1: weights 2/3, 1/3 -> 2*2/3 + 1/3 = 5/3
    assert torch.allclose(out, torch.full_like(a, 5.0 / 3.0), atol=1e-6)
    zero = torch.zeros_like(a)
    assert torch.allclose(mean_attention(a, zero), a)
    assert torch.all(mean_attention(zero, zero) == 0)


def test_softmax_addition_average_l1() -> None:
    a = torch.full((1, 2, 4, 4), 1.0)
    b = torch.zeros((1, 2, 4, 4))
    w = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    assert torch.allclose(softmax_mean(a, b), w[0] * a)
    assert torch.equal(addition(a, b), a)
    assert torch.equal(average(a, b), 0.5 * a)
    assert torch.allclose(l1_norm(a, b), a)
    assert torch.allclose(l1_norm(a, a), a)


def test_strategy_names() -> None:
    assert list(FUSION_STRATEGIES) == [
        "mean-attention",
        "mean-attention-paper",
        "softmax-mean",
        "addition",
        "l1-norm",
        "average",
    ]
    assert FUSION_STRATEGIES["mean-attention-paper"] is mean_attention
    assert STRATEGY_NAMES[0] == DEFAULT_STRATEGY
    assert sorted(STRATEGY_NAMES) == sorted([LEARNED_STRATEGY, *FUSION_STRATEGIES])


def test_strategy_paths() -> None:
    net = FusionNet()
    fusion, rec = net.path(LEARNED_STRATEGY)
    assert fusion is net.stage.layer and rec is net.stage.reconstructor
    fusion, rec = net.path("mean-attention-paper")
    assert fusion is mean_attention and rec is net.reconstructor
    with pytest.raises(ValueError):
        net.path("no-such")


def test_fusion_layer_starts_as_addition_and_bounds_its_gains() -> None:
    torch.manual_seed(2)
    layer = FusionLayer().eval()
    a, b = torch.rand(2, 64, 6, 7), torch.rand(2, 64, 6, 7)
    bias = layer.gains.bias
    assert bias is not None
    with torch.no_grad():
        assert torch.allclose(layer(a, b), addition(a, b), atol=1e-6)
        bias.fill_(50.0)  # every gain saturates at 2
        assert torch.allclose(layer(a, b), 2 * (a + b), atol=1e-5)
        bias[:64].fill_(50.0)  # gain 2 for the CT's features ...
        bias[64:].fill_(-50.0)  # ... 0 for the MR's: choose the CT
        assert torch.allclose(layer(a, b), 2 * a, atol=1e-5)


def test_sharpened_mean_attention() -> None:
    torch.manual_seed(3)
    a, b = torch.rand(2, 8, 5, 5), torch.rand(2, 8, 5, 5)
    # gamma = 1 is the paper's rule
    assert torch.allclose(sharpened_mean_attention(1.0)(a, b), mean_attention(a, b), atol=1e-6)
    # gamma = inf picks, per pixel, the source with the larger channel mean
    hard = sharpened_mean_attention(math.inf)(a, b)
    pick_a = a.mean(1, keepdim=True) >= b.mean(1, keepdim=True)
    assert torch.equal(hard, torch.where(pick_a, a, b))
    # a large finite exponent approaches that choice without underflow
    big = sharpened_mean_attention(200.0)(a * 1e-3, b * 1e-3)
    assert torch.isfinite(big).all()
    clear = ((a.mean(1, keepdim=True) / b.mean(1, keepdim=True)).log().abs() > 0.05).expand_as(a)
    assert torch.allclose(big[clear], hard[clear] * 1e-3, rtol=1e-3, atol=1e-9)


def test_selective_mean_attention() -> None:
    a = torch.full((1, 2, 3, 3), 2.0)
    b = torch.full((1, 2, 3, 3), 1.0)
    assert torch.equal(selective_mean_attention(0.0)(a, b), a)
    assert torch.allclose(selective_mean_attention(0.25)(b, a), a + 0.25 * b)
    with pytest.raises(ValueError):
        selective_mean_attention(1.5)
    with pytest.raises(ValueError):
        sharpened_mean_attention(0.0)
