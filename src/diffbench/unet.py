"""The DDPM U-Net (Ho et al. 2020) shared by every head: the raw network, with no notion of
what its output means — the heads' conversions live in `diffusion.py`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of real-valued t, so fractional ODE times embed smoothly."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ `groups` that divides `channels`."""
    groups = min(groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Start a residual branch at the identity (and the output at zero) for stable early steps."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Two 3×3 convolutions with the time embedding added in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over spatial positions via scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """A residual block optionally followed by attention: the U-Net's repeated unit."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int, attn_heads: int
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout, groups)
        self.attn = SelfAttention(out_ch, attn_heads, groups) if attn_heads else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """DDPM U-Net: `num_res_blocks` blocks per level going down, one more going up, skip
    connections concatenated, attention at the listed spatial resolutions."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        num_heads: int = 1,
        norm_groups: int = 32,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def heads_at(resolution: int) -> int:
            return num_heads if resolution in attention_resolutions else 0

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, resolution = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(
                    Level(ch, base_channels * mult, emb_dim, dropout, norm_groups, heads_at(resolution))
                )
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                resolution //= 2
                skip_channels.append(ch)
        self.mid = nn.ModuleList(
            [
                Level(ch, ch, emb_dim, dropout, norm_groups, max(num_heads, 1)),
                Level(ch, ch, emb_dim, dropout, norm_groups, 0),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                in_ch = ch + skip_channels.pop()
                ch = base_channels * mult
                self.up.append(Level(in_ch, ch, emb_dim, dropout, norm_groups, heads_at(resolution)))
            if level > 0:
                self.up.append(Upsample(ch))
                resolution *= 2
        self.out = nn.Sequential(
            group_norm(ch, norm_groups),
            nn.SiLU(),
            zero_init(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1)),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))
        h = self.stem(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, Level) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, Level):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.out(h)
