"""MaskGIT-VQGAN: the image tokenizer of RAR (bytedance/1d-tokenizer, `maskgit-vqgan-imagenet-f16-256.bin`).

A convolutional VQGAN without attention: TF-"SAME" padded convs, GroupNorm(32) + SiLU ResNet blocks,
average-pool downsampling, nearest + conv upsampling, and a plain squared-L2 nearest-code quantizer on
the encoder output (no quant_conv: the code dimension is z_channels). Images are in [0, 1] on both ends.

State-dict keys are those of the official ``PretrainedTokenizer`` (encoder.*, decoder.*,
quantize.embedding.weight), so the released file loads strictly.

Example:
    >>> tok = MaskGITVQGAN(channel_mult=(1, 2), num_resolutions=2, hidden_channels=32, resolution=12,
    ...                    z_channels=16, num_embeddings=128, embedding_dim=16)
    >>> idx_BN = tok.encode(torch.rand(2, 3, 12, 12))   # [2, 36]
    >>> img_B3HW = tok.decode(idx_BN)                  # [2, 3, 12, 12] in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (output = ceil(input / stride)); odd pads go right/bottom."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)
        k, s = self.kernel_size[0], self.stride[0]
        # With stride 1 and an odd kernel SAME is symmetric: let the conv pad (no extra copy of the input).
        if s == 1 and k % 2 == 1:
            self.padding = (k // 2, k // 2)
            self._explicit_pad = False
        else:
            self._explicit_pad = True

    @staticmethod
    def _pad_total(size: int, k: int, s: int, d: int) -> int:
        return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._explicit_pad:
            ph = self._pad_total(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
            pw = self._pad_total(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
            if ph or pw:
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, bias-less convs; on a channel change the shortcut is nin_shortcut(conv2 out)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = Conv2dSame(in_channels, out_channels, 3, bias=False)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2dSame(out_channels, out_channels, 3, bias=False)
        if in_channels != out_channels:
            # The released weights were trained with this 1x1 conv acting on the *conv2 output* (out -> out),
            # not on the block input, so the block returns h + W h and the input is dropped. Kept as is.
            self.nin_shortcut = Conv2dSame(out_channels, out_channels, 1, bias=False)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        residual = self.nin_shortcut(h) if self.in_channels != self.out_channels else x_BCHW
        return h + residual


class DownBlock(nn.Module):
    """num_res_blocks ResnetBlocks, then a 2x2 average pool unless this is the last level."""

    def __init__(self, block_in: int, block_out: int, num_res_blocks: int, dropout: float, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(block_in if i == 0 else block_out, block_out, dropout) for i in range(num_res_blocks)]
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpBlock(nn.Module):
    """num_res_blocks ResnetBlocks, then nearest x2 + a 3x3 conv unless this is the full-resolution level."""

    def __init__(self, block_in: int, block_out: int, num_res_blocks: int, dropout: float, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(block_in if i == 0 else block_out, block_out, dropout) for i in range(num_res_blocks)]
        )
        self.upsample = upsample
        if upsample:
            self.upsample_conv = Conv2dSame(block_out, block_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if self.upsample:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    """Image [B, 3, H, W] in [0, 1] -> latent [B, z_channels, H/2^(L-1), W/2^(L-1)]."""

    def __init__(
        self,
        channel_mult: Sequence[int],
        num_resolutions: int,
        dropout: float,
        hidden_channels: int,
        num_channels: int,
        num_res_blocks: int,
        z_channels: int,
    ):
        super().__init__()
        ch = hidden_channels
        self.conv_in = Conv2dSame(num_channels, ch, 3, bias=False)
        in_mult = (1,) + tuple(channel_mult)
        self.down = nn.ModuleList(
            [
                DownBlock(
                    ch * in_mult[i], ch * channel_mult[i], num_res_blocks, dropout, downsample=i != num_resolutions - 1
                )
                for i in range(num_resolutions)
            ]
        )
        mid = ch * channel_mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(mid, mid, dropout) for _ in range(num_res_blocks)])
        self.norm_out = _norm(mid)
        self.conv_out = Conv2dSame(mid, z_channels, 1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for blk in self.down:
            h = blk(h)
        for blk in self.mid:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, 3, h*2^(L-1), w*2^(L-1)] (not clamped)."""

    def __init__(
        self,
        channel_mult: Sequence[int],
        num_resolutions: int,
        dropout: float,
        hidden_channels: int,
        num_channels: int,
        num_res_blocks: int,
        z_channels: int,
    ):
        super().__init__()
        ch = hidden_channels
        block_in = ch * channel_mult[num_resolutions - 1]
        self.conv_in = Conv2dSame(z_channels, block_in, 3)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout) for _ in range(num_res_blocks)])
        # up[i] works at level i (i = 0 is full resolution) and runs from the coarsest level down.
        self.up = nn.ModuleList(
            [
                UpBlock(
                    ch * channel_mult[min(i + 1, num_resolutions - 1)],
                    ch * channel_mult[i],
                    num_res_blocks,
                    dropout,
                    upsample=i != 0,
                )
                for i in range(num_resolutions)
            ]
        )
        self.norm_out = _norm(ch * channel_mult[0])
        self.conv_out = Conv2dSame(ch * channel_mult[0], num_channels, 3)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BChw)
        for blk in self.mid:
            h = blk(h)
        for blk in reversed(self.up):
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry by squared L2 distance (no normalisation)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost = commitment_cost
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def distances(self, z_MC: torch.Tensor) -> torch.Tensor:
        """Squared distances [M, V] between rows of z and every code, as |z|^2 + |e|^2 - 2 z.e."""
        e_CV = self.embedding.weight.t()
        base = z_MC.pow(2).sum(1, keepdim=True) + e_CV.pow(2).sum(0, keepdim=True)
        return torch.addmm(base, z_MC, e_CV, alpha=-2.0)

    def forward(self, z_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized z [B, C, h, w] (codebook vectors, no gradient trick), indices [B, h*w])."""
        B, C, h, w = z_BChw.shape
        z_MC = z_BChw.permute(0, 2, 3, 1).reshape(-1, C)
        idx_M = self.distances(z_MC).argmin(dim=1)
        zq_BChw = self.embedding(idx_M).view(B, h, w, C).permute(0, 3, 1, 2).contiguous()
        return zq_BChw, idx_M.view(B, h * w)

    def lookup(self, idx: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Indices [B, h*w] (square grid unless `hw` is given) or [B, h, w] -> code vectors [B, C, h, w]."""
        if idx.ndim == 2:
            n = idx.shape[1]
            if hw is None:
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"{n} tokens do not form a square grid; pass hw=(h, w)")
                hw = (side, side)
            idx = idx.view(idx.shape[0], *hw)
        elif idx.ndim != 3:
            raise ValueError(f"expected token indices [B, N] or [B, h, w], got shape {list(idx.shape)}")
        return self.embedding(idx).permute(0, 3, 1, 2).contiguous()


class MaskGITVQGAN(nn.Module):
    """The MaskGIT-VQGAN tokenizer: encode images in [0, 1] to token ids, decode ids to images in [0, 1]."""

    def __init__(
        self,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_resolutions: int = 5,
        dropout: float = 0.0,
        hidden_channels: int = 128,
        num_channels: int = 3,
        num_res_blocks: int = 2,
        resolution: int = 256,
        z_channels: int = 256,
        num_embeddings: int = 1024,
        embedding_dim: int = 256,
        commitment_cost: float = 0.25,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if len(channel_mult) != num_resolutions:
            raise ValueError(f"channel_mult {channel_mult} needs num_resolutions={num_resolutions} entries")
        if embedding_dim != z_channels:
            raise ValueError(
                f"embedding_dim ({embedding_dim}) must equal z_channels ({z_channels}): "
                f"MaskGIT-VQGAN quantizes the encoder output directly (no quant_conv)"
            )
        bad = [hidden_channels * m for m in (1,) + channel_mult if (hidden_channels * m) % 32]
        if bad:
            raise ValueError(
                f"GroupNorm(32) needs channel counts divisible by 32; hidden_channels="
                f"{hidden_channels} with channel_mult {channel_mult} gives {bad}: "
                f"use a multiple of 32"
            )
        self.resolution = resolution
        self.latent_size = resolution // 2 ** (num_resolutions - 1)
        arch = dict(
            channel_mult=channel_mult,
            num_resolutions=num_resolutions,
            dropout=dropout,
            hidden_channels=hidden_channels,
            num_channels=num_channels,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
        )
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = VectorQuantizer(num_embeddings, embedding_dim, commitment_cost)

    @property
    def vocab_size(self) -> int:
        return self.quantize.num_embeddings

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> token ids [B, h*w] (row-major)."""
        return self.quantize(self.encoder(images_B3HW))[1]

    @torch.no_grad()
    def decode(self, idx: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """Token ids [B, h*w] or [B, h, w] -> images [B, 3, H, W] clamped to [0, 1] (`memory_format`: the
        decoder input's layout, e.g. channels-last for bf16)."""
        return self.decoder(self.quantize.lookup(idx).contiguous(memory_format=memory_format)).clamp(0.0, 1.0)

    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction [B, 3, H, W], unclamped; VQ loss, a scalar).

        The decoder sees the codes through a straight-through estimator, so the reconstruction loss
        reaches the encoder. VQ loss = |sg[z] - e|^2 + commitment_cost * |z - sg[e]|^2 (the VQ-VAE form:
        the codebook term moves the codes, the commitment term keeps the encoder near them).
        """
        z = self.encoder(images_B3HW)
        zq, _ = self.quantize(z)
        codebook_loss = F.mse_loss(zq, z.detach())
        commit_loss = F.mse_loss(z, zq.detach())
        zq_st = z + (zq - z).detach()
        return self.decoder(zq_st), codebook_loss + self.quantize.commitment_cost * commit_loss
