"""RAR: randomized autoregressive image generation (bytedance/1d-tokenizer, `rar_{b,l,xl,xxl}.bin`).

A class-conditional decoder-only transformer over MaskGIT-VQGAN tokens. The sequence is
``[cls, condition, tok_0 .. tok_{N-1}]``; row t of the output predicts the next image token. Every row
also carries a per-position AdaLN condition (class embedding + a learned "timestep" embedding of the
row) and a *target-aware* positional embedding that names the position of the token it must predict,
which is what lets RAR be trained on random token orders and sampled in raster order.

Token space of ``embeddings`` (codebook_size + 1 + classes + 1 rows):
    [0, V)              image tokens
    V                   mask token (unused by RAR)
    V + 1 + c           class c
    V + 1 + classes     the null class (classifier-free guidance; label -1 in this module's API)

State-dict keys equal the official ones; the causal mask is a non-persistent buffer, rebuilt by
`init_non_persistent` after loading onto a meta-built model. The KV cache belongs to each `generate`
call, never to the module, so one model object can serve several threads.

Example:
    >>> m = RAR(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
    ...         image_seq_len=36, condition_num_classes=10, codebook_size=128).eval()
    >>> ids_BN = m.generate(torch.tensor([3, 7]), guidance_scale=4.0, top_k=1)      # [2, 36]
    >>> logits_BN1V, labels_BN = m.forward_fn(ids_BN, m.preprocess_condition(torch.tensor([3, 7])),
    ...                                       return_labels=True)                   # [2, 37, 128]
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from iarmem_core.models import hook_points
from iarmem_core.models.linear import Linear


def build_causal_mask(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Float mask [size, size]: 0 on and below the diagonal, -inf above (added to attention logits)."""
    return torch.full((size, size), float("-inf"), device=device).triu_(1)


def guidance_schedule(step: int, num_steps: int, guidance_scale: float, power: float) -> float:
    """RAR's CFG scale at `step`: (g - 1) * (1 - cos(((step / N) ** power) * pi)) / 2 + 1.

    It rises from 1 to g along a power-warped half cosine; power 0 gives the constant g (0 ** 0 = 1).
    """
    ramp = (1.0 - math.cos(((step / num_steps) ** power) * math.pi)) / 2.0
    return (guidance_scale - 1.0) * ramp + 1.0


def sample_logits(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits: greedy when top_k == 1 or temperature <= 0, else top-k/top-p sampling.

    ``top_k=0`` and ``top_p=0`` (or 1) disable the filters; without them this is the official
    softmax(logits / temperature) + multinomial draw.
    """
    if top_k == 1 or temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted_BV = (cum_BV - sorted_BV.softmax(dim=-1)) >= top_p
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, num_samples=1, generator=generator)[:, 0]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class KVCache:
    """Preallocated keys/values of every block for one generation run: [B, heads, T_max, head_dim] each."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = 0  # rows already stored (the same in every layer)

    def truncated(self, length: int) -> KVCache:
        """A new cache holding a copy of the first `length` rows (a shared prefill, reused by a shorter prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} rows of a cache that holds {self.length}")
        new = copy.copy(self)
        new.k, new.v = [torch.empty_like(t) for t in self.k], [torch.empty_like(t) for t in self.v]
        for src, dst in zip(self.k + self.v, new.k + new.v):
            dst[:, :, :length] = src[:, :, :length]
        new.length = length
        return new

    def update(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's keys/values after the cached ones; returns all keys/values so far."""
        end = self.length + k_BHTd.shape[2]
        self.k[layer][:, :, self.length : end] = k_BHTd
        self.v[layer][:, :, self.length : end] = v_BHTd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention with a biased qkv projection and per-head LayerNorm on q and k."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x_BTC: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x_BTC.shape
        qkv = self.qkv(x_BTC).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q_BHTd, k_BHTd, v_BHTd = qkv.unbind(0)
        q_BHTd, k_BHTd = self.q_norm(q_BHTd), self.k_norm(k_BHTd)
        if cache is not None:
            k_BHTd, v_BHTd = cache.update(layer, k_BHTd, v_BHTd)
        y = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm's Mlp layout); the GELU outputs are the units."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.hook_pre = hook_points.HookPoint()  # [B, T, hidden] fc1 output (pre-activation)
        self.act = nn.GELU()
        self.hook_post = hook_points.HookPoint()  # [B, T, hidden] units = fc2 input
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)
        self.hook_pre.set_bias_source(self.fc1)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        h_BTU = self.hook_post(self.act(self.hook_pre(self.fc1(x_BTC))))
        return self.drop2(self.fc2(self.drop1(h_BTU)))


class Block(nn.Module):
    """DiT-style block: attention and MLP, each modulated and gated by the per-row condition c."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, drop=drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))

    def forward(
        self,
        x_BTC: torch.Tensor,
        c_BTC: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        # chunk order of the released weights (differs from VAR's)
        mod = self.adaLN_modulation(c_BTC).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        attn_in = modulate(self.norm1(x_BTC), shift_msa, scale_msa)
        x_BTC = x_BTC + gate_msa * self.attn(attn_in, attn_mask, cache, layer)
        return x_BTC + gate_mlp * self.mlp(modulate(self.norm2(x_BTC), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm modulated by c (chunk order: scale, shift)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x_BTC: torch.Tensor, c_BTC: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaLN_modulation(c_BTC).chunk(2, dim=-1)
        return modulate(self.norm_final(x_BTC), shift, scale)


def _block_of(path: str) -> tuple[int, str]:
    # "blocks.3.mlp.hook_pre" -> (3, "pre")
    parts = path.split(".")
    return int(parts[1]), parts[-1].removeprefix("hook_")


class RAR(nn.Module):
    """The RAR generator; constructor arguments are the official config names (generator + codebook_size)."""

    PREFIX = 2  # rows before the image tokens: cls, condition

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 3072,
        image_seq_len: int = 256,
        condition_num_classes: int = 1000,
        codebook_size: int = 1024,
        dropout: float = 0.1,
        attn_drop: float = 0.1,
        class_label_dropout: float = 0.1,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        C = hidden_size
        self.hidden_size, self.image_seq_len = C, image_seq_len
        self.num_heads = num_attention_heads
        self.condition_num_classes, self.codebook_size = condition_num_classes, codebook_size
        self.class_label_dropout = class_label_dropout  # used by `forward` only when asked (training)
        self.use_checkpoint = use_checkpoint  # gradient checkpointing of the blocks while training

        # 1. token space
        self.mask_token_id = codebook_size
        self.class_offset = codebook_size + 1
        self.none_condition_id = codebook_size + 1 + condition_num_classes

        # 2. learned vectors, registered first so the key order is the official one. The released tables
        # are longer than needed (+1024 positions, +100 steps); only the first N + 2 rows are ever read.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, image_seq_len + 1024, C))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, image_seq_len + 1024, C))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, image_seq_len + 100, C))  # per-row AdaLN

        # 3. blocks; the official code derives the MLP width as int(C * (intermediate / C))
        mlp_hidden = int(C * (intermediate_size / C))
        self.blocks = nn.ModuleList(
            [
                Block(C, num_attention_heads, mlp_hidden, drop=dropout, attn_drop=attn_drop)
                for _ in range(num_hidden_layers)
            ]
        )
        self.embeddings = nn.Embedding(codebook_size + 1 + condition_num_classes + 1, C)

        # 4. head
        self.adaln_before_head = FinalLayer(C)
        self.lm_head = Linear(C, codebook_size)

        # 5. non-persistent state (absent from the state dict; rebuilt by init_non_persistent)
        self.register_buffer("attn_mask", build_causal_mask(image_seq_len + self.PREFIX), persistent=False)

        if self.cls_token.device.type != "meta":
            self.init_weights()
        hook_points.bind_hook_points(self, _block_of)

    # ---- construction helpers ----------------------------------------------------------------------
    @classmethod
    def from_official_config(cls, config: dict) -> RAR:
        """Build from the official config {"model": {"generator": {...}, "vq_model": {"codebook_size"}}}."""
        model = config.get("model", config)
        g = model["generator"]
        keys = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_seq_len",
            "condition_num_classes",
            "dropout",
            "attn_drop",
            "class_label_dropout",
            "use_checkpoint",
        )
        return cls(codebook_size=model["vq_model"]["codebook_size"], **{k: g[k] for k in keys if k in g})

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init: trunc-normal(0.02) linears and tables, unit LayerNorms, adaLN-zero."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.cls_token.zero_()
        for p in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(p, std=0.02)
        ada = [b.adaLN_modulation[-1] for b in self.blocks] + [self.adaln_before_head.adaLN_modulation[-1]]
        for lin in ada:
            lin.weight.zero_()
            lin.bias.zero_()

    @torch.no_grad()
    def randomize_(self, generator: torch.Generator | None = None) -> RAR:
        """Lively random weights for tests and benchmarks (adaLN-zero would make every block an identity).

        Linear weights N(0, 1/fan_in), biases 0.1 N, LayerNorm weights 1 + 0.1 N, token/class embeddings
        N(0, 1), positional tables 0.5 N: every path, including the gates, carries signal.
        """
        for name, p in self.named_parameters():
            if name in ("cls_token", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings"):
                p.normal_(0.0, 0.5, generator=generator)
            elif name == "embeddings.weight":
                p.normal_(0.0, 1.0, generator=generator)
            elif name.endswith(("norm1.weight", "norm2.weight", "_norm.weight")):
                p.normal_(1.0, 0.1, generator=generator)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=generator)
            else:
                p.normal_(0.0, 0.1, generator=generator)
        return self

    def init_non_persistent(self) -> None:
        """Rebuild the causal mask on the parameters' device (after a load onto a meta-built model)."""
        dev = self.cls_token.device
        mask = build_causal_mask(self.image_seq_len + self.PREFIX, device=dev)
        self.attn_mask = mask.to(self.cls_token.dtype)

    # ---- token space ------------------------------------------------------------------------------
    def preprocess_condition(
        self, labels_B: torch.Tensor, cond_drop_prob: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Raw class ids [B] (-1: null) -> condition token ids; each drops to null with cond_drop_prob."""
        labels_B = labels_B.long()
        cond_B = torch.where(labels_B < 0, self.none_condition_id, labels_B + self.class_offset)
        if cond_drop_prob > 0:
            drop_B = torch.rand(cond_B.shape, generator=generator, device=cond_B.device) < cond_drop_prob
            cond_B = cond_B.masked_fill(drop_B, self.none_condition_id)
        return cond_B

    def sample_orders(
        self,
        batch: int,
        random_ratio: float,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Token orders [B, N]: a random permutation with probability random_ratio, else raster."""
        N = self.image_seq_len
        rows = []
        for _ in range(batch):
            u = float(torch.rand((), generator=generator))
            rows.append(torch.randperm(N, generator=generator) if u < random_ratio else torch.arange(N))
        return torch.stack(rows).to(device or self.cls_token.device)

    # ---- the sequence -------------------------------------------------------------------------------
    def _embed_rows(
        self, cond_B: torch.Tensor, seq_BK: torch.Tensor, row0: int, orders_BN: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (x_BTC, c_BTC) of rows row0.. of [cls, cond, seq_0 .. seq_{K-1}].

        `seq_BK` holds the tokens in the order they are read: seq[:, k] is token orders[:, k] (raster when
        orders is None). Row r gets pos_embed[r] for r < 2 and pos_embed[2 + orders[r - 2]] for tokens,
        plus the target-aware embedding of the token it predicts, TA[2 + orders[r - 1]] for 1 <= r <= N
        (0 on the cls row and the last row), and the AdaLN condition emb(cond) + timesteps[r].
        """
        B, K = seq_BK.shape
        N, P = self.image_seq_len, self.PREFIX
        T_full = K + P
        if K > N:
            raise ValueError(f"got {K} tokens, but this RAR reads at most image_seq_len={N}")
        cond_BC = self.embeddings(cond_B)
        parts = []
        if row0 == 0:
            parts.append(self.cls_token.expand(B, -1, -1))
        if row0 <= 1:
            parts.append(cond_BC[:, None])
        parts.append(self.embeddings(seq_BK[:, max(row0 - P, 0) :]))
        x_BTC = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

        r_T = torch.arange(row0, T_full, device=seq_BK.device)
        ta_keep_T1 = ((r_T >= 1) & (r_T <= N)).to(x_BTC.dtype)[:, None]
        if orders_BN is None:
            pos = self.pos_embed[:, row0:T_full]
            ta = self.target_aware_pos_embed[:, row0 + 1 : T_full + 1]  # row r -> TA[r + 1]
        else:
            o_BN = orders_BN.to(seq_BK.device)
            pos_idx_BT = torch.where(r_T < P, r_T, P + o_BN[:, (r_T - P).clamp(0, N - 1)])
            ta_idx_BT = P + o_BN[:, (r_T - 1).clamp(0, N - 1)]
            pos, ta = self.pos_embed[0][pos_idx_BT], self.target_aware_pos_embed[0][ta_idx_BT]
        x_BTC = x_BTC + pos
        x_BTC = x_BTC + ta * ta_keep_T1
        c_BTC = cond_BC[:, None] + self.timesteps_embeddings[:, row0:T_full]
        return x_BTC, c_BTC

    @staticmethod
    def _targets(
        row0: int, T_full: int, n_tokens: int, device: torch.device, orders_BN: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flat token index predicted by rows row0..T_full-1 (-1 for the cls row and the last row).

        Shape [T]; with orders that differ across the batch, [B, T].
        """
        r_T = torch.arange(row0, T_full, device=device)
        valid_T = (r_T >= 1) & (r_T <= n_tokens)
        if orders_BN is None:
            return torch.where(valid_T, r_T - 1, -1)
        o_BN = orders_BN.to(device)
        t_BT = torch.where(valid_T, o_BN[:, (r_T - 1).clamp(0, n_tokens - 1)], -1)
        return t_BT[0] if bool((t_BT == t_BT[:1]).all()) else t_BT

    def _run_blocks(
        self,
        x_BTC: torch.Tensor,
        c_BTC: torch.Tensor,
        target_T: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None,
        cfg_doubled: bool,
        mode: str,
    ) -> torch.Tensor:
        if attn_mask is not None and attn_mask.dtype != x_BTC.dtype:
            attn_mask = attn_mask.to(x_BTC.dtype)
        with hook_points.call_scope(target_T, cfg_doubled, mode):
            for i, blk in enumerate(self.blocks):
                if self.use_checkpoint and self.training and cache is None:
                    x_BTC = checkpoint(blk, x_BTC, c_BTC, attn_mask, use_reentrant=False)
                else:
                    x_BTC = blk(x_BTC, c_BTC, attn_mask, cache, i)
        if cache is not None:
            cache.length += x_BTC.shape[1]
        return x_BTC

    def head(self, x_BTC: torch.Tensor, c_BTC: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of hidden states and their conditions."""
        return self.lm_head(self.adaln_before_head(x_BTC, c_BTC))

    # ---- teacher forcing --------------------------------------------------------------------------
    def forward_fn(
        self,
        input_ids_BN: torch.Tensor,
        condition_B: torch.Tensor,
        return_labels: bool = False,
        orders_BN: torch.Tensor | None = None,
    ):
        """Teacher forcing on raster tokens [B, K] (K <= N) with condition *token ids* [B] (already offset).

        Returns logits [B, K + 1, V]: row t predicts labels[:, t] (the tokens in the read order; the last
        row predicts nothing). With `orders_BN` [B, N] the tokens, their positions and the target-aware
        positions are permuted (RAR's training); labels are then gather(input_ids, orders).
        Also returns labels [B, K] when return_labels.
        """
        seq_BK = input_ids_BN
        if orders_BN is not None:
            seq_BK = torch.gather(input_ids_BN, 1, orders_BN.to(input_ids_BN.device))
        x_BTC, c_BTC = self._embed_rows(condition_B, seq_BK, 0, orders_BN)
        T = x_BTC.shape[1]
        target = self._targets(0, T, self.image_seq_len, x_BTC.device, orders_BN)
        x_BTC = self._run_blocks(x_BTC, c_BTC, target, self.attn_mask[:T, :T], None, False, "teacher")
        logits = self.head(x_BTC[:, 1:], c_BTC[:, 1:])  # the cls row predicts nothing
        return (logits, seq_BK) if return_labels else logits

    def forward(
        self,
        input_ids_BN: torch.Tensor,
        labels_B: torch.Tensor,
        orders_BN: torch.Tensor | None = None,
        cond_drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training/teacher-forcing pass on raw labels [B] (-1 = null): (logits [B, N, V], targets [B, N]).

        Class labels are dropped to the null class only with cond_drop_prob > 0 (pass
        ``self.class_label_dropout`` when training). The loss is cross_entropy(logits, targets).
        """
        cond_B = self.preprocess_condition(labels_B.to(input_ids_BN.device), cond_drop_prob, generator)
        logits, targets = self.forward_fn(input_ids_BN, cond_B, return_labels=True, orders_BN=orders_BN)
        return logits[:, :-1], targets

    # ---- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, labels_B: torch.Tensor, prefix_BP: torch.Tensor, guidance_scale: float = 0.0) -> KVCache:
        """The KV cache of the rows [cls, cond, tok_0 .. tok_{P-2}] (all before the last prefix row), computed in
        one block-causal call: `truncated(PREFIX + p - 1)` of it starts `generate` with any prefix p <= P, so a
        sweep over prefixes runs one prefill per batch (the same tokens as a prefill per prefix: causal rows
        do not depend on the rows after them)."""
        N, dev = self.image_seq_len, self.cls_token.device
        cond_B = self.preprocess_condition(labels_B.to(dev))
        doubled = guidance_scale != 0
        cond_in = torch.cat([cond_B, torch.full_like(cond_B, self.none_condition_id)]) if doubled else cond_B
        P = prefix_BP.shape[1]
        if not 1 <= P < N or prefix_BP.shape[0] != cond_B.shape[0]:
            raise ValueError(f"prefill needs a prefix [B={cond_B.shape[0]}, 1 <= P < {N}], got {list(prefix_BP.shape)}")
        hd = self.hidden_size // self.num_heads
        cache = KVCache(
            len(self.blocks), cond_in.shape[0], self.num_heads, N + self.PREFIX, hd, dev, self.cls_token.dtype
        )
        seq = prefix_BP[:, : P - 1].to(dev)
        seq = torch.cat([seq, seq]) if doubled else seq
        T_full = P - 1 + self.PREFIX
        x_BTC, c_BTC = self._embed_rows(cond_in, seq, 0)
        mask = self.attn_mask[:T_full, :T_full] if T_full > 1 else None
        self._run_blocks(x_BTC, c_BTC, self._targets(0, T_full, N, dev), mask, cache, doubled, "generate")
        return cache

    @torch.no_grad()
    def generate(
        self,
        labels_B: torch.Tensor,
        guidance_scale: float = 0.0,
        guidance_scale_pow: float = 0.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        prefix_BP: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        kv_cache: bool = True,
        return_logits: bool = False,
        cache: KVCache | None = None,
    ):
        """Raster-order generation: token ids [B, N]; the first P tokens are copied from `prefix_BP`.

        `cache`: a KV cache that already holds the first rows of this generation (`prefill(...).truncated(
        PREFIX + P - 1)`, shared by the prefixes of a sweep); the first call then computes only the rows after it.

        Raw labels [B] (-1: null). Whenever guidance_scale != 0 the batch is doubled to [cond; null] and the
        logits are uncond + (cond - uncond) * guidance_schedule(step). With the KV cache the first call
        reads [cls, cond, prefix] and every later call one token; without it every step recomputes the
        whole sequence (same tokens). With return_logits also returns {"cond": [B, N-P, V], "uncond":
        [B, N-P, V] or None, "cfg": [N-P]}: the last-row logits of each step before mixing.
        """
        N, dev = self.image_seq_len, self.cls_token.device
        cond_B = self.preprocess_condition(labels_B.to(dev))
        B = cond_B.shape[0]
        doubled = guidance_scale != 0
        cond_in = torch.cat([cond_B, torch.full_like(cond_B, self.none_condition_id)]) if doubled else cond_B
        ids_BN = torch.zeros(B, N, dtype=torch.long, device=dev)
        P = 0
        if prefix_BP is not None:
            P = prefix_BP.shape[1]
            if P >= N or prefix_BP.shape[0] != B:
                raise ValueError(f"prefix must be [B={B}, P<{N}] tokens, got {list(prefix_BP.shape)}")
            ids_BN[:, :P] = prefix_BP.to(dev)
        if cache is not None:
            if not kv_cache or cache.length > P + self.PREFIX - 1 or cache.k[0].shape[0] != cond_in.shape[0]:
                raise ValueError(
                    f"a given cache must hold at most the {P + self.PREFIX - 1} rows before the last prefix row "
                    f"for {cond_in.shape[0]} sequences (it holds {cache.length} for {cache.k[0].shape[0]})"
                )
        elif kv_cache:
            cache = KVCache(
                len(self.blocks),
                cond_in.shape[0],
                self.num_heads,
                N + self.PREFIX,
                self.hidden_size // self.num_heads,
                dev,
                self.cls_token.dtype,
            )
        rec = {"cond": [], "uncond": [], "cfg": []}
        first_row = 0 if cache is None else cache.length  # rows the first call need not compute
        for step in range(P, N):
            T_full = step + self.PREFIX  # rows [cls, cond, tok_0 .. tok_{step-1}]; the last predicts `step`
            row0 = 0 if cache is None else (first_row if step == P else T_full - 1)
            seq = ids_BN[:, :step]
            seq = torch.cat([seq, seq]) if doubled else seq
            x_BTC, c_BTC = self._embed_rows(cond_in, seq, row0)
            mask = self.attn_mask[row0:T_full, :T_full] if T_full - row0 > 1 else None
            target = self._targets(row0, T_full, N, dev)
            x_BTC = self._run_blocks(x_BTC, c_BTC, target, mask, cache, doubled, "generate")
            logits_BV = self.head(x_BTC[:, -1:], c_BTC[:, -1:])[:, 0].float()
            if doubled:
                cond_BV, uncond_BV = logits_BV[:B], logits_BV[B:]
                cfg = guidance_schedule(step, N, guidance_scale, guidance_scale_pow)
                logits_BV = uncond_BV + (cond_BV - uncond_BV) * cfg
            if return_logits:
                rec["cond"].append(logits_BV if not doubled else cond_BV)
                rec["uncond"].append(uncond_BV if doubled else None)
                rec["cfg"].append(cfg if doubled else 1.0)
            ids_BN[:, step] = sample_logits(logits_BV, temperature, top_k, top_p, generator)
        if not return_logits:
            return ids_BN
        info = {
            "cond": torch.stack(rec["cond"], 1) if rec["cond"] else None,
            "uncond": torch.stack(rec["uncond"], 1) if doubled and rec["uncond"] else None,
            "cfg": torch.tensor(rec["cfg"], dtype=torch.float32),
        }
        return ids_BN, info
