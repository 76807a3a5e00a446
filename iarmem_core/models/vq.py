"""LlamaGen's image tokenizer (VQ-16 / VQ-8): a taming-style conv autoencoder with an L2-normalised codebook.

State-dict compatible with the official ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` (FoundationVision/LlamaGen,
``tokenizer/tokenizer_image/vq_model.py``). Layout facts that the key names depend on:

- Encoder levels are ``encoder.conv_blocks.{i}`` (i = 0 is full resolution), each with ``res.{j}``,
  ``attn.{j}`` (only at the last, lowest-resolution level) and ``downsample`` (all but the last level).
- Decoder levels are stored deepest-first: ``decoder.conv_blocks.0`` is the lowest resolution, with attention,
  and every level but the last has ``upsample``. Decoder levels hold ``num_res_blocks + 1`` ResnetBlocks.
- ``mid`` is a ModuleList [ResnetBlock, AttnBlock, ResnetBlock]; AttnBlock has separate q/k/v/proj_out
  1x1 convs.
- ``quantize.codebook_used`` is a persistent buffer (usage statistics of training; unused here).

Images are in [-1, 1]; decoded images are not clamped (as in the official code).

Example:
    >>> vq = VQModel(codebook_size=128, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=32, ch=32)
    >>> idx_BN = vq.encode(torch.rand(2, 3, 12, 12) * 2 - 1)     # [2, 36]
    >>> img_B3HW = vq.decode_code(idx_BN)                         # [2, 3, 12, 12]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 ``nin_shortcut`` on the input when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.in_ch != self.out_ch:
            x_BChw = self.nin_shortcut(x_BChw)
        return x_BChw + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with separate q/k/v/proj_out 1x1 convs."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        h = self.norm(x_BChw)
        # [B, 1, hw, C]: one head over all channels, scale 1/sqrt(C)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out_BLC = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x_BChw + self.proj_out(out_BLC.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (halves h and w)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """[B, 3, H, W] -> [B, z_channels, H / 2^(levels-1), W / 2^(levels-1)]."""

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        z_channels: int = 256,
    ):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        n_levels = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = ch
        for level, mult in enumerate(ch_mult):
            blk = nn.Module()
            blk.res = nn.ModuleList()
            blk.attn = nn.ModuleList()
            c_out = ch * mult
            for _ in range(num_res_blocks):
                blk.res.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if level == n_levels - 1:  # attention only at the lowest resolution
                    blk.attn.append(AttnBlock(c_in))
            if level != n_levels - 1:
                blk.downsample = Downsample(c_in)
            self.conv_blocks.append(blk)
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in, dropout), AttnBlock(c_in), ResnetBlock(c_in, c_in, dropout)])
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for blk in self.conv_blocks:
            for j in range(self.num_res_blocks):
                h = blk.res[j](h)
                if len(blk.attn):
                    h = blk.attn[j](h)
            if hasattr(blk, "downsample"):
                h = blk.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, 3, h * 2^(levels-1), w * 2^(levels-1)]; levels stored deepest-first."""

    def __init__(
        self,
        z_channels: int = 256,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        out_channels: int = 3,
    ):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        n_levels = len(ch_mult)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in, dropout), AttnBlock(c_in), ResnetBlock(c_in, c_in, dropout)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(n_levels)):  # index 0 = the deepest level
            blk = nn.Module()
            blk.res = nn.ModuleList()
            blk.attn = nn.ModuleList()
            c_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                blk.res.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if level == n_levels - 1:
                    blk.attn.append(AttnBlock(c_in))
            if level != 0:
                blk.upsample = Upsample(c_in)
            self.conv_blocks.append(blk)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BChw)
        for m in self.mid:
            h = m(h)
        for blk in self.conv_blocks:
            for j in range(self.num_res_blocks + 1):
                h = blk.res[j](h)
                if len(blk.attn):
                    h = blk.attn[j](h)
            if hasattr(blk, "upsample"):
                h = blk.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantiser; with ``l2_norm`` both latents and codewords are unit vectors."""

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        l2_norm: bool = True,
        show_usage: bool = True,
    ):
        super().__init__()
        self.n_e, self.e_dim, self.l2_norm = n_e, e_dim, l2_norm
        # training-only settings of the official tokenizer, kept for reference (iarmem never trains it)
        self.beta, self.entropy_loss_ratio = beta, entropy_loss_ratio
        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if show_usage:
            # the official keeps a window of recently used codes; persistent, so checkpoints carry it
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        """The codewords as used for lookup, [n_e, e_dim] (L2-normalised when l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> (quantised latents [B, C, h, w], indices [B, h*w] in raster order)."""
        B, C, H, W = z_BChw.shape
        z_NC = z_BChw.permute(0, 2, 3, 1).reshape(-1, C)
        if self.l2_norm:
            z_NC = F.normalize(z_NC, p=2, dim=-1)
        e_VC = self.codebook()
        # squared distance |z|^2 + |e|^2 - 2 z.e, the official formula (argmin ties resolve the same way)
        d_NV = z_NC.pow(2).sum(1, keepdim=True) + e_VC.pow(2).sum(1) - 2 * z_NC @ e_VC.t()
        idx_N = d_NV.argmin(dim=1)
        zq_NC = e_VC[idx_N]
        if self.training:  # straight-through estimator
            zq_NC = z_NC + (zq_NC - z_NC).detach()
        zq_BChw = zq_NC.view(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        return zq_BChw, idx_N.view(B, H * W)

    def lookup(self, idx: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Indices [B, h*w] or [B, h, w] -> codewords [B, C, h, w]; `shape` = (B, C, h, w), default square."""
        B = idx.shape[0]
        if shape is not None:
            h, w = int(shape[2]), int(shape[3])
        elif idx.ndim == 3:
            h, w = idx.shape[1], idx.shape[2]
        else:
            h = w = math.isqrt(idx[0].numel())
            if h * w != idx[0].numel():
                raise ValueError(f"{idx[0].numel()} tokens per image is not a square grid: pass shape=(B, C, h, w)")
        return self.codebook()[idx.reshape(B, h * w)].view(B, h, w, self.e_dim).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer; the constructor takes the official ModelArgs names plus ``ch`` (128)."""

    def __init__(
        self,
        codebook_size: int = 16384,
        codebook_embed_dim: int = 8,
        codebook_l2_norm: bool = True,
        codebook_show_usage: bool = True,
        commit_loss_beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        encoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        z_channels: int = 256,
        dropout_p: float = 0.0,
        ch: int = 128,
        num_res_blocks: int = 2,
        in_channels: int = 3,
        out_channels: int = 3,
    ):
        super().__init__()
        self.codebook_size, self.codebook_embed_dim = codebook_size, codebook_embed_dim
        self.downsample = 2 ** (len(encoder_ch_mult) - 1)
        # 1. the conv autoencoder
        self.encoder = Encoder(in_channels, ch, encoder_ch_mult, num_res_blocks, dropout_p, z_channels)
        self.decoder = Decoder(z_channels, ch, decoder_ch_mult, num_res_blocks, dropout_p, out_channels)
        # 2. the quantiser and the 1x1 convs into and out of codebook space
        self.quantize = VectorQuantizer(
            codebook_size,
            codebook_embed_dim,
            commit_loss_beta,
            entropy_loss_ratio,
            codebook_l2_norm,
            codebook_show_usage,
        )
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    def encode_latent(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> pre-quantisation latents [B, codebook_embed_dim, H/ds, W/ds]."""
        return self.quant_conv(self.encoder(x_B3HW))

    def encode(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> token indices [B, h*w] (raster order)."""
        return self.quantize(self.encode_latent(x_B3HW))[1]

    def decode(self, zq_BChw: torch.Tensor) -> torch.Tensor:
        """Quantised latents -> images [B, 3, H, W], nominally in [-1, 1], not clamped."""
        return self.decoder(self.post_quant_conv(zq_BChw))

    def decode_code(
        self,
        idx: torch.Tensor,
        shape: Sequence[int] | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> torch.Tensor:
        """Indices [B, h*w] -> images [B, 3, H, W] (not clamped); `shape` = (B, C, h, w), default square;
        `memory_format`: the decoder input's layout (e.g. channels-last for bf16)."""
        return self.decode(self.quantize.lookup(idx, shape).contiguous(memory_format=memory_format))

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Reconstruction decode(quantize(encode(x))), [B, 3, H, W]."""
        return self.decode(self.quantize(self.encode_latent(x_B3HW))[0])
