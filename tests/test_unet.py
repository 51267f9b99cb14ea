"""The U-Net: preset sizes, output contract, numerics under bf16 / channels_last / compile."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffbench.core.unet import AttentionBlock, UNet, count_parameters, timestep_embedding

# Tiny tensors: a second intra-op thread only adds OpenMP stalls on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")

UNET_DDPM_CIFAR: dict[str, Any] = dict(
    in_channels=3,
    image_size=32,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.1,
    num_heads=1,
    norm_groups=32,
)
UNET_SMALL: dict[str, Any] = dict(
    in_channels=1,
    image_size=8,
    base_channels=16,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    attention_resolutions=(4,),
    dropout=0.0,
    num_heads=1,
    norm_groups=8,
)
TINY: dict[str, Any] = dict(
    in_channels=2,
    image_size=8,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_heads=2,
    norm_groups=4,
)


def randomized(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised layers random weights, so output comparisons are not 0 == 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return net.eval()


def inputs(net: UNet, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reproducible images and integer timesteps in 1..1000 sized for `net`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=generator)
    t = torch.randint(1, 1001, (batch,), generator=generator)
    return x, t


def test_cifar_preset_matches_ddpm_size() -> None:
    net = UNet(**UNET_DDPM_CIFAR)
    n = count_parameters(net)
    assert n == 35_746_307  # DDPM's CIFAR-10 net, and diffusers' UNet2DModel in this layout
    assert abs(n - 35.7e6) < 0.01 * 35.7e6
    x, t = inputs(net, batch=1)
    with torch.no_grad():
        out = net.eval()(x, t)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32


def test_small_preset_size_and_output() -> None:
    net = UNet(**UNET_SMALL)
    assert count_parameters(net) == 926_817
    x, t = inputs(net, batch=5)
    out = net(x, t)
    assert out.shape == (5, 1, 8, 8) and out.dtype == torch.float32


def test_out_channels_overrides_input_channels() -> None:
    net = UNet(**{**TINY, "out_channels": 5})
    x, t = inputs(net, batch=3)
    assert net(x, t).shape == (3, 5, 8, 8)


def test_count_parameters_counts_every_tensor_once() -> None:
    layer = nn.Linear(3, 4)
    assert count_parameters(nn.Sequential(layer, layer)) == 3 * 4 + 4


def test_untrained_net_outputs_exact_zeros_yet_learns() -> None:
    torch.manual_seed(0)
    net = UNet(**TINY)
    x, t = inputs(net, batch=4)
    assert torch.equal(net(x, t), torch.zeros_like(x))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    F.mse_loss(net(x, t), x).backward()
    optimizer.step()
    assert net(x, t).abs().min() > 0


def test_output_depends_on_time_and_float_time_equals_integer_time() -> None:
    net = randomized(UNet(**TINY))
    x, _ = inputs(net, batch=3)
    t_int = torch.tensor([1, 250, 1000])
    with torch.no_grad():
        out = net(x, t_int)
        assert torch.equal(out, net(x, t_int.double()))
        assert torch.equal(out, net(x, t_int.float()))
        assert not torch.allclose(out, net(x, t_int.float() + 0.5))
        scalar = net(x, torch.tensor(250.0))
        assert torch.equal(scalar, net(x, torch.full((3,), 250)))


def test_timestep_embedding_is_sinusoidal() -> None:
    t = torch.tensor([0.0, 3.5])
    emb = timestep_embedding(t, dim=6)
    freqs = torch.tensor([1.0, 10_000 ** (-1 / 3), 10_000 ** (-2 / 3)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, dim=7).shape == (2, 7)


def test_bf16_autocast_forward_is_finite_and_close_to_fp32() -> None:
    net = randomized(UNet(**TINY))
    x, t = inputs(net, batch=4)
    with torch.no_grad():
        reference = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert torch.isfinite(out).all()
    scale = reference.abs().max()
    assert (out.float() - reference).abs().max() < 0.1 * scale


def test_bf16_autocast_backward_gives_finite_gradients() -> None:
    net = randomized(UNet(**UNET_SMALL)).train()
    x, t = inputs(net, batch=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.mse_loss(net(x, t).float(), x)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_channels_last_matches_contiguous() -> None:
    net = randomized(UNet(**TINY))
    x, t = inputs(net, batch=3)
    with torch.no_grad():
        reference = net(x, t)
        net.to(memory_format=torch.channels_last)
        out = net(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_attention_matches_brute_force_softmax() -> None:
    torch.manual_seed(0)
    heads, channels, size = 2, 8, 3
    block = randomized(AttentionBlock(channels, num_heads=heads, norm_groups=4))
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = block(x, torch.empty(0))
        qkv = block.qkv(block.norm(x)).flatten(2)  # (B, 3C, HW): q, k, v blocks of C channels
        head_dim = channels // heads
        heads_out = []
        for h in range(heads):
            q, k, v = (
                qkv[:, part * channels + h * head_dim : part * channels + (h + 1) * head_dim]
                for part in range(3)
            )
            weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(head_dim), dim=-1)
            heads_out.append(v @ weights.transpose(1, 2))  # (B, head_dim, HW)
        attended = torch.cat(heads_out, dim=1).reshape(x.shape)
        expected = x + block.proj(attended)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_graph_has_no_breaks_and_matches_eager() -> None:
    net = randomized(UNet(**TINY))
    x, t = inputs(net, batch=2)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x, t.float() + 0.25), net(x, t.float() + 0.25))


@pytest.mark.slow
def test_inductor_compiled_net_matches_eager() -> None:
    net = randomized(UNet(**TINY))
    x, t = inputs(net, batch=2)
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-4, atol=1e-5)


def test_every_down_activation_feeds_the_up_path() -> None:
    net = UNet(**UNET_DDPM_CIFAR)
    down_stages = len(net.down)
    assert len(net.up) == down_stages + 1  # the stem's output is the extra skip
    assert down_stages == 4 * 2 + 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_channels": 12, "norm_groups": 8}, "groups do not divide"),
        ({"attention_resolutions": (16,)}, "not among"),
        ({"num_heads": 3}, "heads do not divide"),
        ({"image_size": 6, "channel_mult": (1, 1, 1)}, "cannot be halved"),
    ],
)
def test_inconsistent_configs_are_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet(**{**TINY, **overrides})
