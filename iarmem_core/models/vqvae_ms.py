"""VAR's multi-scale residual VQVAE, state-dict compatible with FoundationVision/VAR `vae_ch160v4096z32.pth`.

An image in [-1, 1] is encoded to a feature map f [B, Cvae, h, w] (h = w = the last patch number), which
is quantised coarse to fine: at scale si the residual ``f - f_hat`` is area-downsampled to pn x pn, each
position takes its nearest codebook entry, and the entries are bicubic-upsampled back to h x w, passed
through a small residual conv Phi and added to ``f_hat``. The token maps of all scales form the VAR input.

Example:
    >>> vae = VQVAE(vocab_size=128, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 3, 4))
    >>> idx_list = vae.img_to_idxBl(torch.rand(2, 3, 8, 8) * 2 - 1)   # [B,1], [B,4], [B,9], [B,16]
    >>> img_B3HW = vae.idxBl_to_img(idx_list, same_shape=True, last_one=True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VQVAE", "VectorQuantizer2", "Encoder", "Decoder", "Phi"]


# ---------------------------------------------------------------------------------------------------
# 1. Encoder / decoder: a taming-style ResNet (GroupNorm(32, eps 1e-6) + SiLU), as in the official
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        # a 1x1 conv on the block *input* when the width changes (no keys otherwise)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, 1, 0) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused 1x1 qkv conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.C = channels
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        qkv = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, H * W)
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in qkv.unbind(1))  # each [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v, scale=C**-0.5)  # [B, 1, HW, C]
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x_BChw + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, then a stride-2 conv


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (only at the lowest resolution), resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, using_mid_sa: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        c_in = ch
        for lvl in range(self.num_resolutions):
            level = _Level()
            c_in, c_out = ch * in_mult[lvl], ch * ch_mult[lvl]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if lvl == self.num_resolutions - 1 and using_sa:
                    level.attn.append(AttnBlock(c_in))
            if lvl != self.num_resolutions - 1:
                level.downsample = Downsample2x(c_in)
            self.down.append(level)
        self.mid = _Mid(c_in, dropout, using_mid_sa)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, 1, 1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] -> features [B, z_channels, H/2^(levels-1), W/2^(levels-1)]."""
        h = self.conv_in(x_B3HW)
        for lvl, level in enumerate(self.down):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if lvl != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, 1, 1)
        self.mid = _Mid(c_in, dropout, using_mid_sa)
        levels: list[_Level] = []
        for lvl in reversed(range(self.num_resolutions)):
            level = _Level()
            c_out = ch * ch_mult[lvl]
            for _ in range(num_res_blocks + 1):  # one more block per level than the encoder
                level.block.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if lvl == self.num_resolutions - 1 and using_sa:
                    level.attn.append(AttnBlock(c_in))
            if lvl != 0:
                level.upsample = Upsample2x(c_in)
            levels.insert(0, level)  # `up.{i}` is indexed by resolution level, i=0 the full resolution
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, in_channels, 3, 1, 1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Features [B, z_channels, h, w] -> image [B, 3, h*2^(levels-1), w*2^(levels-1)] (not clamped)."""
        h = self.mid(self.conv_in(z_BChw))
        for lvl in reversed(range(self.num_resolutions)):
            level = self.up[lvl]
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if lvl != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------------
# 2. Multi-scale residual quantiser
class Phi(nn.Conv2d):
    """Phi(h) = (1 - r) h + r conv3x3(h): the residual refinement applied to each upsampled scale."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw * (1 - self.resi_ratio) + super().forward(h_BChw) * self.resi_ratio


class PhiBank(nn.Module):
    """K Phi layers shared by S scales; `pick(si / (S-1))` returns the one whose tick is nearest.

    The state-dict layout follows the official sharing mode: ``share_quant_resi == 0`` gives one Phi per
    scale under ``quant_resi.{k}``, ``1`` a single ``quant_resi.qresi``, K > 1 ``quant_resi.qresi_ls.{k}``.
    """

    def __init__(self, channels: int, quant_resi: float, share_quant_resi: int, n_scales: int):
        super().__init__()
        K = {0: n_scales, 1: 1}.get(share_quant_resi, share_quant_resi)

        def make() -> nn.Module:
            return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            for k in range(K):
                self.add_module(str(k), make())
            self._phis = [getattr(self, str(k)) for k in range(K)]
        elif share_quant_resi == 1:
            self.qresi = make()
            self._phis = [self.qresi]
        else:
            self.qresi_ls = nn.ModuleList([make() for _ in range(K)])
            self._phis = list(self.qresi_ls)
        # official ticks: K == 4 -> linspace(1/12, 11/12, 4), else linspace(1/2K, 1-1/2K, K) (float64)
        self.ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)

    def pick(self, at_0_to_1: float) -> nn.Module:
        if len(self._phis) == 1:
            return self._phis[0]
        return self._phis[int(np.argmin(np.abs(self.ticks - at_0_to_1)))]

    def forward(self, *_: object) -> None:
        raise RuntimeError("PhiBank is a container: call pick(si / (S - 1))(h_BChw)")


class VectorQuantizer2(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        using_znorm: bool = False,
        beta: float = 0.25,
        default_qresi_counts: int = 0,
        v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
    ):
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.using_znorm, self.beta = using_znorm, beta
        self.v_patch_nums = tuple(int(p) for p in v_patch_nums)
        n_phi = default_qresi_counts or len(self.v_patch_nums)
        self.quant_resi = PhiBank(Cvae, quant_resi, share_quant_resi, n_phi)
        # training statistic (codebook hits per scale); persistent so official files load strictly
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.record_hit = 0
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def phi(self, si: int, SN: int) -> nn.Module:
        return self.quant_resi.pick(si / (SN - 1))

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index [N] of the nearest codebook entry (squared L2, or cosine with using_znorm)."""
        e_VC = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(e_VC, dim=-1).T, dim=1)
        d_NV = z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1)
        d_NV = torch.addmm(d_NV, z_NC, e_VC.T, beta=1, alpha=-2)
        return torch.argmin(d_NV, dim=1)

    def _up(self, h_BChw: torch.Tensor, si: int, SN: int, H: int, W: int) -> torch.Tensor:
        """Bicubic upsampling to the last scale's size (none at the last scale), then Phi."""
        if si != SN - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
        return self.phi(si, SN)(h_BChw)

    # ---- encoding ------------------------------------------------------------------------------------
    @torch.no_grad()
    def f_to_idxBl_or_fhat(
        self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Features -> per-scale ids [B, pn*pn] (with to_fhat: the cumulative f_hat [B, C, H, W])."""
        B, C, H, W = f_BChw.shape
        pns = [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in (v_patch_nums or self.v_patch_nums)]
        if pns[-1] != (H, W):
            raise ValueError(f"the last patch number {pns[-1]} must equal the feature size {(H, W)}")
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        SN = len(pns)
        out: list[torch.Tensor] = []
        for si, (ph, pw) in enumerate(pns):
            z = F.interpolate(f_rest, size=(ph, pw), mode="area") if si != SN - 1 else f_rest
            idx_N = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2).contiguous()
            h_BChw = self._up(h_BChw, si, SN, H, W)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    # ---- decoding ------------------------------------------------------------------------------------
    def idxBl_to_h(self, ms_idx_Bl: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale ids [B, pn*pn] -> per-scale code maps [B, C, pn, pn]."""
        out = []
        for idx_Bl in ms_idx_Bl:
            B, l = idx_Bl.shape
            pn = round(l**0.5)
            out.append(self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return out

    def embed_to_fhat(
        self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Per-scale code maps -> f_hat after the last scale, or the list of cumulative f_hat per scale."""
        SN = len(self.v_patch_nums)
        B = ms_h_BChw[0].shape[0]
        dtype = self.embedding.weight.dtype
        out: list[torch.Tensor] = []
        if all_to_max_scale:
            H = W = self.v_patch_nums[-1]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=dtype)
            for si in range(len(ms_h_BChw)):
                f_hat = f_hat + self._up(ms_h_BChw[si], si, SN, H, W)
                out.append(f_hat)
        else:  # experimental in the official code: grow f_hat scale by scale instead of working at full size
            p0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, p0, p0, dtype=dtype)
            for si, pn in enumerate(self.v_patch_nums[: len(ms_h_BChw)]):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic") + self.phi(si, SN)(ms_h_BChw[si])
                out.append(f_hat)
        return out[-1] if last_one else out

    # ---- VAR inputs ----------------------------------------------------------------------------------
    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Per-scale ids -> the VAR teacher-forcing input [B, L - first_l, Cvae] (None with one scale).

        Scale si+1's input is the area-downsampled running f_hat after scales 0..si.
        """
        SN = len(self.v_patch_nums)
        H = W = self.v_patch_nums[-1]
        B = gt_ms_idx_Bl[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, W)
        nxt: list[torch.Tensor] = []
        for si, h_BChw in enumerate(self.idxBl_to_h(gt_ms_idx_Bl[: SN - 1])):
            f_hat = f_hat + self._up(h_BChw, si, SN, H, W)
            pn = self.v_patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").reshape(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(nxt, dim=1) if nxt else None

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's codes [B, C, pn, pn] to f_hat: (f_hat, next scale's input [B, C, pn', pn'])."""
        H = W = self.v_patch_nums[-1]
        f_hat = f_hat + self._up(h_BChw, si, SN, H, W)
        if si == SN - 1:
            return f_hat, f_hat
        pn = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable quantisation: (f_hat with a straight-through gradient [B, C, H, W], vq_loss scalar).

        vq_loss = mean over scales of ``beta * |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2``: the first term
        commits the encoder, the second trains the codebook and Phi. In train mode the per-scale codebook
        hits are tracked in ``ema_vocab_hit_SV`` (first batch copied, then EMA 0.9 for 100 steps, then 0.99).
        """
        f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        SN = len(self.v_patch_nums)
        loss = f_BChw.new_zeros(())
        for si, pn in enumerate(self.v_patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            idx_N = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            if self.training:
                self._record_hits(si, idx_N)
            h_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            h_BChw = self._up(h_BChw, si, SN, H, W)
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_no_grad)
        f_st = f_BChw + (f_hat - f_no_grad).detach()  # straight-through: value f_hat, gradient to f
        return f_st, loss / SN

    @torch.no_grad()
    def _record_hits(self, si: int, idx_N: torch.Tensor) -> None:
        hit_V = idx_N.bincount(minlength=self.vocab_size).to(self.ema_vocab_hit_SV.dtype)
        if si == 0:
            self.record_hit += 1
        ema = self.ema_vocab_hit_SV[si]
        if self.record_hit == 1:
            ema.copy_(hit_V)
        else:
            m = 0.9 if self.record_hit <= 100 else 0.99
            ema.mul_(m).add_(hit_V * (1 - m))


# ---------------------------------------------------------------------------------------------------
# 3. The VQVAE
class VQVAE(nn.Module):
    """Multi-scale VQVAE; official argument names, plus `ch_mult` etc. (hard-coded in the official)."""

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 128,
        dropout: float = 0.0,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        test_mode: bool = True,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        in_channels: int = 3,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.v_patch_nums = tuple(int(p) for p in v_patch_nums)
        self.ch_mult = tuple(int(m) for m in ch_mult)
        self.downsample = 2 ** (len(self.ch_mult) - 1)
        dd = dict(
            ch=ch,
            ch_mult=self.ch_mult,
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            in_channels=in_channels,
            z_channels=z_channels,
            using_sa=using_sa,
            using_mid_sa=using_mid_sa,
        )
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer2(
            vocab_size,
            z_channels,
            using_znorm=using_znorm,
            beta=beta,
            default_qresi_counts=default_qresi_counts,
            v_patch_nums=self.v_patch_nums,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
        )
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, pad)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.v_patch_nums[-1] * self.downsample

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> features [B, Cvae, h, w] (quant_conv applied)."""
        return self.quant_conv(self.encoder(img_B3HW))

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Quantised features -> image [B, 3, H, W] clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1)

    @torch.no_grad()
    def img_to_idxBl(self, img_B3HW: torch.Tensor, v_patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Image in [-1, 1] -> per-scale token ids, a list of [B, pn*pn] LongTensors."""
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(img_B3HW), to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(
        self, ms_idx_Bl: Sequence[torch.Tensor], same_shape: bool = True, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Per-scale ids -> image [B, 3, H, W] in [-1, 1] (last_one) or one image per scale (progressive)."""
        return self.embed_to_img(self.quantize.idxBl_to_h(ms_idx_Bl), all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(
        self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        f = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        return self.fhat_to_img(f) if last_one else [self.fhat_to_img(x) for x in f]

    @torch.no_grad()
    def img_to_reconstructed_img(
        self, img_B3HW: torch.Tensor, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Encode and decode: the reconstruction after the last scale, or after every scale."""
        fs = self.quantize.f_to_idxBl_or_fhat(self.img_to_f(img_B3HW), to_fhat=True)
        return self.fhat_to_img(fs[-1]) if last_one else [self.fhat_to_img(f) for f in fs]

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: image in [-1, 1] -> (reconstruction [B, 3, H, W], not clamped; vq_loss scalar)."""
        f_hat, vq_loss = self.quantize(self.img_to_f(img_B3HW))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss
