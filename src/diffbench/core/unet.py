"""The DDPM U-Net (Ho et al. 2020, in the improved-diffusion layout) shared by every diffusion head.

It is only the raw network `(x_t, t) -> tensor shaped like x_t`: what that output means (ε, x0 or
score) is decided by the heads in `core/heads.py`. `forward` has no data-dependent Python branches,
so it runs eagerly, under `torch.autocast`, in channels_last and under `torch.compile` alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def count_parameters(module: nn.Module) -> int:
    """Number of (distinct) parameters, to compare model sizes across configs and papers."""
    return sum(p.numel() for p in module.parameters())


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of t read as real numbers, so ODE samplers may pass fractional times.

    Always computed in float32: equal integer and float timesteps give bit-identical features,
    and large t keeps its precision under bf16 autocast.
    """
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(features, (0, dim - 2 * half))


def group_norm(channels: int, norm_groups: int) -> nn.GroupNorm:
    """GroupNorm with min(norm_groups, channels) groups; a ragged split is a config error."""
    groups = min(norm_groups, channels)
    if channels % groups:
        raise ValueError(f"{groups} normalisation groups do not divide {channels} channels")
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer so the residual branch (or the whole output) it ends starts as exactly 0."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding added between them, plus a skip path."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, added back residually.

    The 1x1 qkv convolution's 3C output channels are laid out as (q, k, v) x heads x head_dim.
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"{num_heads} attention heads do not divide {channels} channels")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """`emb` is unused; it is accepted so every block of a stage has one signature."""
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, -1)
        # Contiguous q, k, v let scaled_dot_product_attention take its fused kernel.
        q, k, v = (part.contiguous() for part in qkv.transpose(-1, -2).unbind(dim=1))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, height, width))


class Downsample(nn.Module):
    """Halve the resolution with a learned stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """`emb` is unused; it is accepted so every block of a stage has one signature."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour repeat, then a 3x3 convolution to smooth it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """`emb` is unused; it is accepted so every block of a stage has one signature."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """Blocks run in sequence between two skip-connection taps, all given the time embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            x = block(x, emb)
        return x


class UNet(nn.Module):
    """DDPM U-Net: `num_res_blocks` residual blocks per level going down and one more per level
    coming up, every down-path activation concatenated into the up path, attention at the listed
    spatial resolutions and in the middle. Output layer and residual branches start at zero, so
    an untrained network outputs exactly 0 whatever its input."""

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
        num_levels = len(channel_mult)
        if num_levels < 1 or num_res_blocks < 1:
            raise ValueError("need at least one level and one residual block per level")
        if image_size % 2 ** (num_levels - 1):
            raise ValueError(f"image_size {image_size} cannot be halved {num_levels - 1} times")
        resolutions = [image_size // 2**level for level in range(num_levels)]
        unreachable = sorted(set(attention_resolutions) - set(resolutions))
        if unreachable:
            raise ValueError(f"attention_resolutions {unreachable} not among {resolutions}")

        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = image_size
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_dim, dropout, norm_groups)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, norm_groups)

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, (mult, resolution) in enumerate(zip(channel_mult, resolutions)):
            for _ in range(num_res_blocks):
                blocks: list[nn.Module] = [res(ch, base_channels * mult)]
                ch = base_channels * mult
                if resolution in attention_resolutions:
                    blocks.append(attn(ch))
                self.down.append(Stage(blocks))
                skip_channels.append(ch)
            if level < num_levels - 1:
                self.down.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle = Stage([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level in reversed(range(num_levels)):
            out_ch = base_channels * channel_mult[level]
            for block_index in range(num_res_blocks + 1):
                blocks = [res(ch + skip_channels.pop(), out_ch)]
                ch = out_ch
                if resolutions[level] in attention_resolutions:
                    blocks.append(attn(ch))
                if level > 0 and block_index == num_res_blocks:
                    blocks.append(Upsample(ch))
                self.up.append(Stage(blocks))

        self.out = nn.Sequential(
            group_norm(ch, norm_groups),
            nn.SiLU(),
            zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1)),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Map x (B, C, H, W) at timesteps t ((B,) or scalar; int or float) to (B, C_out, H, W)."""
        t = t.reshape(-1).expand(x.shape[0])
        features = timestep_embedding(t, self.base_channels)
        emb = self.time_embed(features.to(self.time_embed[0].weight.dtype))
        h = self.stem(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
