"""VAR: the next-scale prediction transformer, state-dict compatible with FoundationVision/VAR `var_d*.pth`.

The token sequence is the concatenation of the scales' token maps (L = sum pn^2, 680 for VAR-256). Row 0
is the start token ``class_emb(label) + pos_start``; the rows of scale si > 0 hold ``word_embed`` of the
area-downsampled running f_hat after scales < si (`VectorQuantizer2.idxBl_to_var_input`). Attention is
block-causal by scale, so the rows of scale si predict the tokens of scale si. Every block is an AdaLN
block conditioned on the class embedding.

The VQVAE is not part of this module (VAR keys carry no ``vae.`` prefix); generation takes it as an
argument. The model holds no per-call state: the KV cache lives in the `generate` call.

Example:
    >>> var = VAR(vocab_size=128, Cvae=8, num_classes=10, depth=2, embed_dim=64, num_heads=2,
    ...           patch_nums=(1, 2, 3, 4), attn_l2_norm=True)
    >>> logits_BLV = var(label_B, vae.quantize.idxBl_to_var_input(idx_list))        # [B, 30, 128]
    >>> idx_list = var.generate(vae, label_B, cfg=1.5, top_k=1)                        # greedy
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from iarmem_core.models import hook_points
from iarmem_core.models.linear import Linear, linear

__all__ = [
    "VAR",
    "AdaLNSelfAttn",
    "SelfAttention",
    "FFN",
    "AdaLNBeforeHead",
    "SharedAdaLin",
    "sample_with_top_k_top_p_",
]


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.p, self.training)


# ---------------------------------------------------------------------------------------------------
# 1. Blocks
class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2. The units are the fc2 inputs; `hook_pre`/`hook_post` expose them."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.hook_pre = hook_points.HookPoint()  # [B, T, U] pre-activation fc1(x)
        self.act = nn.GELU(approximate="tanh")
        self.hook_post = hook_points.HookPoint()  # [B, T, U] units GELU(fc1 x)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.hook_pre.set_bias_source(self.fc1)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.hook_post(self.act(self.hook_pre(self.fc1(x_BLC))))))


class SelfAttention(nn.Module):
    """Multi-head attention; with attn_l2_norm, q and k are unit vectors and q is scaled per head."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_l2_norm: bool = False,
    ):
        super().__init__()
        assert embed_dim % num_heads == 0, f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}"
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))  # k has no bias; persistent in the official
        self.proj = Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(
        self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None, cache: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`cache` ([] or [k, v]) is extended in place with this call's keys and values (KV-cache steps)."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, c]
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul_1H11)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            if cache:
                k = torch.cat((cache[0], k), dim=2)
                v = torch.cat((cache[1], v), dim=2)
            cache[:] = [k, v]
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        p = self.attn_drop if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p, scale=self.scale)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, L, C)))


class SharedAdaLin(Linear):
    """The d36 variant: one Linear(D, 6C) shared by all blocks, output [B, 1, 6, C]."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * attn(LN(x)(1+scale1)+shift1); x += gamma2 * ffn(LN(x)(1+scale2)+shift2)."""

    def __init__(
        self,
        embed_dim: int,
        cond_dim: int,
        shared_aln: bool,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = False,
    ):
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop=attn_drop, proj_drop=drop, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), Linear(cond_dim, 6 * embed_dim))

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond_BD: torch.Tensor,
        attn_bias: torch.Tensor | None,
        cache: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`cond_BD` is the class embedding [B, D], or with shared_aln the shared output [B, 1, 6, C]."""
        if self.shared_aln:
            ada_B16C = self.ada_gss + cond_BD
        else:
            ada_B16C = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)  # official order
        h = self.attn(self.ln_wo_grad(x_BLC) * (scale1 + 1) + shift1, attn_bias, cache)
        x_BLC = x_BLC + self.drop_path(h * gamma1)
        h = self.ffn(self.ln_wo_grad(x_BLC) * (scale2 + 1) + shift2)
        return x_BLC + self.drop_path(h * gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC) * (scale + 1) + shift


# ---------------------------------------------------------------------------------------------------
# 2. Sampling
def sample_with_top_k_top_p_(
    logits_BlV: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    rng: torch.Generator | None = None,
    num_samples: int = 1,
) -> torch.Tensor:
    """Sample ids [B, l, num_samples] with the official filters (modifies `logits_BlV` in place).

    top-k keeps the logits >= the k-th largest; top-p sorts ascending and drops the tokens whose ascending
    cumulative probability is <= 1 - top_p, always keeping the largest.
    """
    B, l, V = logits_BlV.shape
    if top_k > 0:
        kth = logits_BlV.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV.masked_fill_(drop_sorted.scatter(-1, sorted_idx, drop_sorted), -torch.inf)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=num_samples, replacement=True, generator=rng).view(B, l, num_samples)


# ---------------------------------------------------------------------------------------------------
# 3. The transformer
class VAR(nn.Module):
    def __init__(
        self,
        vocab_size: int = 4096,
        Cvae: int = 32,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        cond_drop_rate: float = 0.1,
        attn_l2_norm: bool = False,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        flash_if_available: bool = True,
        fused_if_available: bool = True,
        vae_local: nn.Module | None = None,
    ):
        """Official argument names. The official takes `vae_local` for V and Cvae; here they are arguments
        (`vae_local` is still accepted and overrides them). The flash/fused switches are accepted and
        ignored: attention always goes through F.scaled_dot_product_attention and the MLP through fc1/fc2,
        so unit hooks always fire."""
        super().__init__()
        if vae_local is not None:
            vocab_size, Cvae = vae_local.vocab_size, vae_local.Cvae
        # 0. hyperparameters
        self.V, self.Cvae = vocab_size, Cvae
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.num_classes = num_classes
        self.cond_drop_rate = cond_drop_rate  # label dropout, applied only in train mode
        self.shared_aln = shared_aln
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends: list[tuple[int, int]] = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_stages_minus_1 = len(self.patch_nums) - 1

        # 1. input (word) embedding of the VQVAE features
        self.word_embed = Linear(Cvae, embed_dim)

        # 2. class embedding (row num_classes is the null class) and start-token position
        init_std = math.sqrt(1 / embed_dim / 3)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, embed_dim))

        # 3. absolute position embedding per token and level (scale) embedding
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, embed_dim))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p, mean=0, std=init_std)

        # 4. backbone blocks (drop-path rate linear in depth; Python math so this runs on meta)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C)) if shared_aln else nn.Identity()
        )
        self.drop_path_rate = drop_path_rate
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                AdaLNSelfAttn(
                    embed_dim,
                    self.D,
                    shared_aln,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_eps=norm_eps,
                    attn_l2_norm=attn_l2_norm,
                )
                for i in range(depth)
            ]
        )

        # 5. block-causal mask and token levels (persistent buffers in the official checkpoints)
        self.register_buffer("lvl_1L", torch.zeros(1, self.L, dtype=torch.long))
        self.register_buffer("attn_bias_for_masking", torch.zeros(1, 1, self.L, self.L))
        self.init_non_persistent()

        # 6. classifier head
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps=norm_eps)
        self.head = Linear(self.C, self.V)

        hook_points.bind_hook_points(self, _block_of)

    # ---- construction helpers ----------------------------------------------------------------------
    @torch.no_grad()
    def init_non_persistent(self) -> None:
        """(Re)compute the level ids and the block-causal mask from patch_nums, on the buffers' device."""
        dev = self.lvl_1L.device
        lvl_L = torch.cat([torch.full((pn * pn,), i, device=dev) for i, pn in enumerate(self.patch_nums)])
        self.lvl_1L = lvl_L.view(1, self.L).to(torch.long)
        bias_LL = torch.where(lvl_L[:, None] >= lvl_L[None, :], 0.0, -torch.inf)
        self.attn_bias_for_masking = bias_LL.view(1, 1, self.L, self.L).to(self.attn_bias_for_masking.dtype)

    @torch.no_grad()
    def init_weights(
        self,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        init_std: float = 0.02,
    ) -> None:
        """The official initialisation for training from scratch (init_std < 0: sqrt(1/(3C)))."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if b.shared_aln:
                b.ada_gss[:, :, 2:].mul_(init_adaln)
                b.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                w = b.ada_lin[-1].weight
                w[2 * self.C :].mul_(init_adaln)
                w[: 2 * self.C].mul_(init_adaln_gamma)
                b.ada_lin[-1].bias.zero_()

    # ---- core ----------------------------------------------------------------------------------------
    def _lvl_pos(self, bg: int, ed: int) -> torch.Tensor:
        """Level + absolute position embedding of rows [bg, ed): [1, ed-bg, C]."""
        return self.lvl_embed(self.lvl_1L[:, bg:ed]) + self.pos_1LC[:, bg:ed]

    def _sos(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Start rows [B, first_l, C] (without level/position embedding)."""
        B = cond_BD.shape[0]
        return cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)

    def _blocks(
        self,
        x_BLC: torch.Tensor,
        cond_BD: torch.Tensor,
        attn_bias: torch.Tensor | None,
        target_index: torch.Tensor,
        cfg_doubled: bool,
        mode: str,
        caches: list[list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Run all blocks and the head: logits [B, l, V] (float32)."""
        ada = self.shared_ada_lin(cond_BD)
        with hook_points.call_scope(target_index, cfg_doubled, mode):
            for i, b in enumerate(self.blocks):
                x_BLC = b(x_BLC, ada, attn_bias, None if caches is None else caches[i])
        return self.head(self.head_nm(x_BLC, cond_BD)).float()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor | None) -> torch.Tensor:
        """Teacher forcing: labels [B] and inputs [B, l - first_l, Cvae] -> logits [B, l, V].

        l is normally L; a shorter input covering whole scales gives the logits of those scales.
        Label dropout (cond_drop_rate) is applied only in train mode.
        """
        B = label_B.shape[0]
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        x_BLC = self._sos(cond_BD)
        if x_BLCv_wo_first_l is not None and x_BLCv_wo_first_l.shape[1] > 0:
            w = self.word_embed.weight
            x_BLC = torch.cat((x_BLC, self.word_embed(x_BLCv_wo_first_l.to(w.dtype))), dim=1)
        ed = x_BLC.shape[1]
        if ed not in [e for _, e in self.begin_ends]:
            raise ValueError(f"input covers {ed} rows, which is not a scale boundary of {self.patch_nums}")
        x_BLC = x_BLC + self._lvl_pos(0, ed)
        attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        target = torch.arange(ed, device=x_BLC.device)
        return self._blocks(x_BLC, cond_BD, attn_bias, target, False, "teacher")

    # ---- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        vae: nn.Module,
        label_B: torch.Tensor,
        *,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        temperature: float = 1.0,
        g_seed: int | None = None,
        rng: torch.Generator | None = None,
        prefix_idx_Bl: Sequence[torch.Tensor] | None = None,
        kv_cache: bool = True,
        on_logits: Callable[[int, torch.Tensor], None] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sample scale by scale: (per-scale ids [B, pn*pn], final f_hat [B, Cvae, h, w]).

        - CFG as the official `autoregressive_infer_cfg`: with cfg > 0 the batch is [cond; null class] and
          at scale si the logits are (1+t) cond - t uncond, t = cfg * si / (S-1); cfg == 0 does not double.
        - `temperature` divides the mixed logits (1 leaves them untouched; the official has no temperature),
          then top-k / top-p filter as the official and sample with `rng` (or a Generator seeded by `g_seed`).
          ``top_k=1`` is greedy (argmax, no random draw).
        - `prefix_idx_Bl`: true ids of the first P scales, teacher-forced in one prefill call; generation
          starts at scale P.
        - ``kv_cache=False`` recomputes all rows up to the current scale at every step (same tokens).
        - `on_logits(si, logits_BlV)` sees the mixed logits before filtering.
        """
        quant = vae.quantize
        if tuple(quant.v_patch_nums) != self.patch_nums:
            raise ValueError(f"VQVAE patch_nums {quant.v_patch_nums} differ from the transformer's {self.patch_nums}")
        B = label_B.shape[0]
        dev = self.lvl_1L.device
        if rng is None and g_seed is not None:
            rng = torch.Generator(device=dev)
            rng.manual_seed(int(g_seed))
        doubled = cfg != 0
        labels = torch.cat((label_B, torch.full_like(label_B, self.num_classes))) if doubled else label_B
        cond_BD = self.class_emb(labels.to(dev))
        S = len(self.patch_nums)
        P = 0 if prefix_idx_Bl is None else len(prefix_idx_Bl)
        if P >= S:
            raise ValueError(f"a prefix of {P} scales leaves nothing to generate ({S} scales)")
        caches: list[list[torch.Tensor]] | None = [[] for _ in self.blocks] if kv_cache else None
        dtype = self.word_embed.weight.dtype

        # rows_BLC: the input rows of every scale so far (kept whole for the no-cache path)
        rows_BLC = self._sos(cond_BD) + self._lvl_pos(0, self.first_l)
        f_hat = quant.embedding.weight.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        out: list[torch.Tensor] = []
        new_bg = 0  # first row not yet seen by the KV cache
        for si, pn in enumerate(self.patch_nums):
            bg, ed = self.begin_ends[si]
            if si < P:
                idx_Bl = prefix_idx_Bl[si].to(dev).reshape(B, pn * pn).long()
            else:
                if kv_cache:
                    # rows [new_bg, ed) are new to the cache: this scale, plus after a prefix all prefix rows
                    # (the prefill, one block-causal call); a plain step needs no mask
                    bias = self.attn_bias_for_masking[:, :, new_bg:ed, :ed] if new_bg < bg else None
                    target = torch.arange(new_bg, ed, device=dev)
                    x_BlC = rows_BLC[:, new_bg:ed]
                    logits = self._blocks(x_BlC, cond_BD, bias, target, doubled, "generate", caches)
                    logits = logits[:, bg - new_bg :]  # the rows of this scale
                    new_bg = ed
                else:
                    bias = self.attn_bias_for_masking[:, :, :ed, :ed]
                    logits = self._blocks(
                        rows_BLC[:, :ed], cond_BD, bias, torch.arange(ed, device=dev), doubled, "generate"
                    )[:, bg:]
                if doubled:
                    t = cfg * si / self.num_stages_minus_1
                    logits = (1 + t) * logits[:B] - t * logits[B:]
                if on_logits is not None:
                    on_logits(si, logits)
                if temperature != 1.0:
                    logits = logits / temperature
                if top_k == 1:
                    idx_Bl = logits.argmax(dim=-1)
                else:
                    ids_Bl1 = sample_with_top_k_top_p_(logits.clone(), top_k=top_k, top_p=top_p, rng=rng)
                    idx_Bl = ids_Bl1[:, :, 0]
            out.append(idx_Bl)
            h_BChw = quant.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, nxt_BChw = quant.get_next_autoregressive_input(si, S, f_hat, h_BChw)
            if si < S - 1:
                nb, ne = self.begin_ends[si + 1]
                nxt_BlC = self.word_embed(nxt_BChw.reshape(B, self.Cvae, -1).transpose(1, 2).to(dtype))
                nxt_BlC = nxt_BlC + self._lvl_pos(nb, ne)
                if doubled:
                    nxt_BlC = nxt_BlC.repeat(2, 1, 1)
                rows_BLC = torch.cat((rows_BLC, nxt_BlC), dim=1)
        return out, f_hat


def _block_of(path: str) -> tuple[int, str]:
    # "blocks.{i}.ffn.hook_pre" -> (i, "pre")
    parts = path.split(".")
    return int(parts[1]), parts[-1].removeprefix("hook_")
