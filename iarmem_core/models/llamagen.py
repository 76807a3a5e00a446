"""LlamaGen class-conditional GPT (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``), our own code.

State-dict compatible with the official ``c2i_*.pt`` files (88 keys for GPT-B, no buffers). The sequence is
``[class token, tok_0, ..., tok_{N-2}]`` and row t predicts raster token t of the ``g x g`` grid (N = g*g =
block_size). Facts of the official model that matter numerically:

- RMSNorm is computed in float32 and cast back before the weight multiplies.
- Attention: one ``wqkv`` (split [dim, kv_dim, kv_dim], grouped-query via ``n_kv_head``), 2D RoPE on q and k,
  causal SDPA with scale 1/sqrt(head_dim), ``wo``; no biases anywhere.
- 2D RoPE works on interleaved pairs (x[2i], x[2i+1]); the first head_dim/4 pairs turn with the token's row,
  the next head_dim/4 with its column. The class token's rows of the table are all zeros (not identity), so
  its q and k are exactly zero.
- FFN is SwiGLU ``w2(silu(w1 x) * w3 x)`` with hidden ``find_multiple(int(2*4*dim/3) [* ffn_dim_multiplier],
  multiple_of)``.
- Generation (official ``generate.py``): prefill on the class token, then one token per step with a KV cache.
  CFG (only when cfg_scale > 1) doubles the batch as [cond; null class] and mixes
  ``uncond + (cond - uncond) * cfg_scale``; after step ``cfg_interval`` (when > -1) only cond is used.
  Sampling: logits / max(temperature, 1e-5), HF-style top-k then top-p, softmax, multinomial.

Unlike the official code, the KV cache is a per-call object (`KVCache`), never module state, so one model
object can serve several threads.

Example:
    >>> gpt = Transformer(dim=64, n_layer=2, n_head=4, vocab_size=128, num_classes=10, block_size=36)
    >>> logits_BNV, _ = gpt(idx=torch.randint(128, (2, 35)), cond_idx=torch.tensor([3, 7]))   # [2, 36, 128]
    >>> ids_BN = generate(gpt, torch.tensor([3, 7]), cfg_scale=4.0, top_k=1)                    # [2, 36]
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from iarmem_core.models import hook_points
from iarmem_core.models.linear import Linear


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU hidden width of the official FeedForward."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


def precompute_freqs_cis_2d(
    grid_size: int,
    head_dim: int,
    base: float = 10000,
    cls_token_num: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """2D RoPE table [cls_token_num + grid^2, head_dim/2, 2] of (cos, sin); the class rows are zeros."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4 (row and column halves of pairs), got {head_dim}")
    half = head_dim // 2  # pairs; the first half/2 turn with the row, the rest with the column
    k = torch.arange(half // 2, device=device, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (2 * k / half))
    angle_gF = torch.outer(torch.arange(grid_size, device=device, dtype=torch.float32), inv_freq)
    angle_ggP = torch.cat(
        [angle_gF[:, None, :].expand(-1, grid_size, -1), angle_gF[None, :, :].expand(grid_size, -1, -1)],
        dim=-1,
    )
    table_NP2 = torch.stack([angle_ggP.cos(), angle_ggP.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2, device=device), table_NP2])


def apply_rotary_emb(x_BTHD: torch.Tensor, freqs_TP2: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (in float32) by the table rows of its positions; same dtype out."""
    xs = x_BTHD.float().reshape(*x_BTHD.shape[:-1], -1, 2)
    f = freqs_TP2.view(1, xs.shape[1], 1, xs.shape[3], 2)
    cos, sin = f[..., 0], f[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x_BTHD)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p (training only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class KVCache:
    """Keys/values of one generation call: per layer [B, n_kv_head, max_len, head_dim], filled to `length`."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.k = [torch.zeros(batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.max_len = max_len
        self.length = 0  # positions filled so far (advanced by Transformer.step after all layers ran)

    def truncated(self, length: int) -> KVCache:
        """A new cache holding a copy of the first `length` positions (a shared prefill, reused by a shorter
        prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} positions of a cache that holds {self.length}")
        new = copy.copy(self)
        new.k, new.v = [torch.zeros_like(t) for t in self.k], [torch.zeros_like(t) for t in self.v]
        for src, dst in zip(self.k + self.v, new.k + new.v):
            dst[:, :, :length] = src[:, :, :length]
        new.length = length
        return new

    def update(self, layer: int, start: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor):
        """Write positions [start, start+T) of `layer`; return its keys and values [B, H, start+T, D]."""
        end = start + k_BHTD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer][:, :, start:end] = k_BHTD
        self.v[layer][:, :, start:end] = v_BHTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class LabelEmbedder(nn.Module):
    """Class label -> one token; row ``num_classes`` (if class_dropout_prob > 0) is the null class."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(
        self, labels_B: torch.Tensor, drop: bool = False, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Labels [B] -> embeddings [B, 1, dim]; `drop` swaps labels for the null class w.p. dropout_prob."""
        if force_drop_ids is not None:
            labels_B = torch.where(force_drop_ids == 1, self.num_classes, labels_B)
        elif drop and self.dropout_prob > 0:
            dropped = torch.rand(labels_B.shape[0], device=labels_B.device) < self.dropout_prob
            labels_B = torch.where(dropped, self.num_classes, labels_B)
        return self.embedding_table(labels_B).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, attn_dropout_p: float, resid_dropout_p: float):
        super().__init__()
        if dim % n_head or n_head % n_kv_head:
            raise ValueError(f"dim {dim} must divide by n_head {n_head}, and n_head by n_kv_head {n_kv_head}")
        self.dim, self.n_head, self.n_kv_head = dim, n_head, n_kv_head
        self.head_dim = dim // n_head
        self.wqkv = Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def forward(
        self,
        x_BTC: torch.Tensor,
        freqs_TP2: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x_BTC).split([self.dim, kv, kv], dim=-1)
        q = apply_rotary_emb(q.view(B, T, self.n_head, self.head_dim), freqs_TP2).transpose(1, 2)
        k = apply_rotary_emb(k.view(B, T, self.n_kv_head, self.head_dim), freqs_TP2).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        rep = self.n_head // self.n_kv_head
        if T == 1 and not (self.training and self.attn_dropout_p > 0):
            # one query (a KV-cache step): a plain softmax(q k^T / sqrt(d)) v is several times faster on CPU
            # than the fused kernel, and query heads grouped per kv head need no repeated keys
            q_BGRD = q.reshape(B, self.n_kv_head, rep, self.head_dim)
            att_BGRL = (q_BGRD @ k.transpose(-1, -2)) * self.head_dim**-0.5
            y = (att_BGRL.float().softmax(-1).to(v.dtype) @ v).reshape(B, self.n_head, 1, self.head_dim)
            return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, self.dim)))
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        L = k.shape[2]  # keys cover positions [0, L); queries are positions [start, start + T) = [L - T, L)
        mask = None
        if T > 1 and L > T:
            pos = torch.arange(L, device=x_BTC.device)
            mask = pos[None, :] <= pos[L - T :, None]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, self.dim)))


class FeedForward(nn.Module):
    """SwiGLU; ``hook_pre`` sees the gate w1(x), ``hook_post`` the units silu(w1 x) * w3 x (the w2 input)."""

    def __init__(self, dim: int, hidden: int, ffn_dropout_p: float):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout_p)
        self.hook_pre = hook_points.HookPoint()  # [B, T, hidden] gate before SiLU (w1 has no bias)
        self.hook_post = hook_points.HookPoint()  # [B, T, hidden] the units

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        gate_BTU = self.hook_pre(self.w1(x_BTC))
        units_BTU = self.hook_post(F.silu(gate_BTU) * self.w3(x_BTC))
        return self.ffn_dropout(self.w2(units_BTU))


class TransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        n_head: int,
        n_kv_head: int,
        hidden: int,
        norm_eps: float,
        drop_path: float,
        attn_dropout_p: float,
        resid_dropout_p: float,
        ffn_dropout_p: float,
    ):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, attn_dropout_p, resid_dropout_p)
        self.feed_forward = FeedForward(dim, hidden, ffn_dropout_p)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.drop_path = drop_path

    def forward(
        self,
        x_BTC: torch.Tensor,
        freqs_TP2: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        h = x_BTC + _drop_path(
            self.attention(self.attention_norm(x_BTC), freqs_TP2, cache, layer, start),
            self.drop_path,
            self.training,
        )
        return h + _drop_path(self.feed_forward(self.ffn_norm(h)), self.drop_path, self.training)


class Transformer(nn.Module):
    """LlamaGen c2i GPT; the constructor takes the official ModelArgs fields (t2i-only ones are ignored)."""

    def __init__(
        self,
        dim: int = 4096,
        n_layer: int = 32,
        n_head: int = 32,
        n_kv_head: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        token_dropout_p: float = 0.1,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.1,
        ffn_dropout_p: float = 0.1,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        caption_dim: int = 2048,
        class_dropout_prob: float = 0.1,
        model_type: str = "c2i",
        vocab_size: int = 16384,
        cls_token_num: int = 1,
        block_size: int = 256,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
    ):
        super().__init__()
        if model_type != "c2i":
            raise NotImplementedError(
                f"model_type {model_type!r}: iarmem implements the class-conditional 'c2i' LlamaGen only"
            )
        if cls_token_num != 1:
            # the official c2i path embeds one class token; other values break its own shapes
            raise ValueError(f"c2i LlamaGen uses cls_token_num=1 (got {cls_token_num})")
        grid = math.isqrt(block_size)
        if grid * grid != block_size:
            raise ValueError(f"block_size {block_size} is not a square token grid (e.g. 256 = 16x16)")
        self.dim, self.n_layer, self.n_head = dim, n_layer, n_head
        self.n_kv_head = n_head if n_kv_head is None else n_kv_head
        self.head_dim = dim // n_head
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.block_size, self.grid = block_size, grid  # N tokens on a grid x grid raster
        self.cls_token_num, self.rope_base = cls_token_num, rope_base
        self.initializer_range = initializer_range
        self.ffn_hidden = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)

        # 1. class and token embeddings
        self.cls_embedding = LabelEmbedder(num_classes, dim, class_dropout_prob)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.tok_dropout = nn.Dropout(token_dropout_p)
        # 2. blocks, with the official linear drop-path schedule (Python math: works on meta)
        dpr = [drop_path_rate * i / (n_layer - 1) if n_layer > 1 else 0.0 for i in range(n_layer)]
        self.layers = nn.ModuleList(
            TransformerBlock(
                dim,
                n_head,
                self.n_kv_head,
                self.ffn_hidden,
                norm_eps,
                dpr[i],
                attn_dropout_p,
                resid_dropout_p,
                ffn_dropout_p,
            )
            for i in range(n_layer)
        )
        # 3. head
        self.norm = RMSNorm(dim, norm_eps)
        self.output = Linear(dim, vocab_size, bias=False)
        # 4. RoPE table: a plain attribute, so it stays out of the state dict (as in the official model)
        self.freqs_cis = precompute_freqs_cis_2d(grid, self.head_dim, rope_base, cls_token_num)
        self.initialize_weights()
        hook_points.bind_hook_points(self, _block_of)

    def initialize_weights(self) -> None:
        """The official init: N(0, initializer_range) for linears and embeddings, a zero output head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, self.initializer_range)
        nn.init.zeros_(self.output.weight)

    def init_non_persistent(self) -> None:
        """(Re)compute the RoPE table (after building on meta and loading a state dict)."""
        self.freqs_cis = precompute_freqs_cis_2d(self.grid, self.head_dim, self.rope_base, self.cls_token_num)

    def _freqs(self, device: torch.device) -> torch.Tensor:
        if self.freqs_cis.device != device:
            if self.freqs_cis.is_meta:
                raise RuntimeError("the RoPE table is on meta: call init_non_persistent() after loading weights")
            self.freqs_cis = self.freqs_cis.to(device)  # float32 always, like the official table
        return self.freqs_cis

    def _run(
        self, h_BTC: torch.Tensor, start: int, cache: KVCache | None, cfg_doubled: bool, mode: str
    ) -> torch.Tensor:
        """Run the blocks on rows at positions [start, start+T) and the final norm; [B, T, dim]."""
        T = h_BTC.shape[1]
        freqs_TP2 = self._freqs(h_BTC.device)[start : start + T]
        # position p (0 = class token) predicts raster token p; positions >= N predict nothing
        target_T = torch.arange(start, start + T, device=h_BTC.device)
        target_T = torch.where(target_T < self.block_size, target_T, -1)
        with hook_points.call_scope(target_T, cfg_doubled, mode):
            for i, layer in enumerate(self.layers):
                h_BTC = layer(h_BTC, freqs_TP2, cache, i, start)
        return self.norm(h_BTC)

    def _embed(
        self,
        cond_B: torch.Tensor | None,
        idx_BL: torch.Tensor | None,
        drop_labels: bool = False,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = []
        if cond_B is not None:
            parts.append(self.cls_embedding(cond_B, drop_labels, force_drop_ids)[:, : self.cls_token_num])
        if idx_BL is not None and idx_BL.shape[1] > 0:
            parts.append(self.tok_embeddings(idx_BL))
        return self.tok_dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def forward(
        self,
        idx: torch.Tensor | None,
        cond_idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        drop_labels: bool = False,
        force_drop_ids: torch.Tensor | None = None,
        cfg_doubled: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: tokens [B, L < N], labels [B] -> (logits [B, 1+L, V] float32, CE loss or None).

        ``logits[:, t]`` predicts raster token t. ``drop_labels=True`` applies the training label dropout
        (class_dropout_prob); dropout layers follow train/eval mode as usual.
        """
        h_BTC = self._embed(cond_idx, idx, drop_labels, force_drop_ids)
        if h_BTC.shape[1] > self.cls_token_num + self.block_size:
            raise ValueError(f"sequence of {h_BTC.shape[1]} rows exceeds class token + {self.block_size} tokens")
        logits_BTV = self.output(self._run(h_BTC, 0, None, cfg_doubled, "teacher")).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), targets.reshape(-1))
        return logits_BTV, loss

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` rows (default: class + N-1 tokens)."""
        p = self.output.weight
        max_len = self.cls_token_num + self.block_size - 1 if max_len is None else max_len
        return KVCache(self.n_layer, batch, self.n_kv_head, max_len, self.head_dim, p.device, p.dtype)

    def step(
        self,
        cond_B: torch.Tensor | None,
        idx_BT: torch.Tensor | None,
        cache: KVCache | None = None,
        *,
        cfg_doubled: bool = False,
    ) -> torch.Tensor:
        """One generation call; returns the last row's logits [B, V] (float32).

        With a cache, the rows are appended at ``cache.length`` (the first call passes the class label
        `cond_B`, and optionally prefix tokens, as the prefill; later calls pass only new tokens). Without a
        cache the whole sequence [class, idx] is recomputed.
        """
        start = cache.length if cache is not None else 0
        if (cond_B is not None) != (start == 0):
            raise ValueError("the class label goes with the first call (the prefill), and only with it")
        h_BTC = self._embed(cond_B, idx_BT)
        h_BTC = self._run(h_BTC, start, cache, cfg_doubled, "generate")
        if cache is not None:
            cache.length = start + h_BTC.shape[1]
        return self.output(h_BTC[:, -1]).float()


def _block_of(path: str) -> tuple[int, str]:
    # "layers.{i}.feed_forward.hook_{pre,post}" -> (i, kind)
    parts = path.split(".")
    return int(parts[1]), parts[-1].removeprefix("hook_")


# ---------------------------------------------------------------------------------------------------
# Sampling (the official generate.py semantics; the loop is separate from the network)
def top_k_top_p_filter(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF-style filter (new tensor): keep the top_k logits, then the fewest whose mass reaches top_p."""
    logits_BV = logits_BV.clone()
    if top_k > 0:
        k = min(top_k, logits_BV.shape[-1])
        kth = torch.topk(logits_BV, k, dim=-1).values[..., -1:]
        logits_BV[logits_BV < kth] = -float("inf")
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = cum_BV > top_p
        # shift right: keep the first token that crosses the threshold (and always the most likely one)
        drop_BV[..., 1:] = drop_BV[..., :-1].clone()
        drop_BV[..., 0] = False
        logits_BV[drop_BV.scatter(1, order_BV, drop_BV)] = -float("inf")
    return logits_BV


def sample_logits(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] from last-position logits: argmax when greedy, else a filtered multinomial draw."""
    if greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits_BV = top_k_top_p_filter(logits_BV, top_k, top_p)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


@torch.no_grad()
def prefill(model: Transformer, cond_B: torch.Tensor, prefix_BP: torch.Tensor, cfg_scale: float = 1.0) -> KVCache:
    """The KV cache of the class and the prefix tokens 0 .. P-2 (all before the last prefix token), in one call:
    `truncated(cls_token_num + p - 1)` of it starts `generate` with any prefix 1 <= p <= P, so a sweep over
    prefixes runs one prefill per batch (the same tokens as a prefill per prefix: causal positions do not depend
    on the ones after them)."""
    P = prefix_BP.shape[1]
    if not 1 <= P < model.block_size or prefix_BP.shape[0] != cond_B.shape[0]:
        raise ValueError(f"prefill needs a prefix [B={cond_B.shape[0]}, 1 <= P < {model.block_size}]")
    use_cfg = cfg_scale > 1.0
    cond_in = torch.cat([cond_B, torch.full_like(cond_B, model.num_classes)]) if use_cfg else cond_B
    seq = prefix_BP[:, : P - 1].to(cond_B.device)
    cache = model.new_cache(cond_in.shape[0], model.cls_token_num + model.block_size - 1)
    model.step(cond_in, torch.cat([seq, seq]) if use_cfg else seq, cache, cfg_doubled=use_cfg)
    return cache


@torch.no_grad()
def generate(
    model: Transformer,
    cond_B: torch.Tensor,
    *,
    prefix_BP: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: float = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
    return_logits: bool = False,
    max_new_tokens: int | None = None,
    cache: KVCache | None = None,
):
    """Class-conditional generation -> ids [B, P + max_new_tokens] (int64; default N), the prefix in front.

    ``cache``: a KV cache that already holds the first positions of this generation (`prefill(...).truncated(
    cls_token_num + P - 1)`, shared by the prefixes of a sweep); the first call computes only the rest.

    ``prefix_BP``: P true tokens fed in the prefill (teacher-forced). CFG as in the official code: only when
    ``cfg_scale > 1``; the token predicted at decode step i (token k = i + 1) uses the cond half alone once
    ``cfg_interval > -1 and k - 1 > cfg_interval``. ``return_logits`` also returns the mixed (pre-temperature)
    logits of each generated token, [B, max_new_tokens, V]. ``kv_cache=False`` recomputes the whole
    sequence at every step.
    """
    B, dev = cond_B.shape[0], cond_B.device
    P = 0 if prefix_BP is None else prefix_BP.shape[1]
    N = model.block_size if max_new_tokens is None else P + max_new_tokens
    if not 0 <= P < N <= model.block_size:
        raise ValueError(f"asked for {N - P} new tokens after a prefix of {P}; the grid has {model.block_size}")
    use_cfg = cfg_scale > 1.0
    if use_cfg and model.cls_embedding.embedding_table.num_embeddings <= model.num_classes:
        raise ValueError("CFG needs the null-class row, but this model was built with class_dropout_prob=0")
    cond_in = torch.cat([cond_B, torch.full_like(cond_B, model.num_classes)]) if use_cfg else cond_B
    seq_BN = torch.zeros(B, N, dtype=torch.long, device=dev)
    if P:
        seq_BN[:, :P] = prefix_BP
    step_logits = []

    def dup(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if use_cfg else x

    if cache is not None:
        have = cache.length - model.cls_token_num  # prefix tokens already in the given cache
        if not kv_cache or P < 1 or not 0 <= have < P or cache.k[0].shape[0] != cond_in.shape[0]:
            raise ValueError(
                f"a given cache must hold the class and at most {P - 1} of the P >= 1 prefix tokens for "
                f"{cond_in.shape[0]} sequences (it holds {cache.length} positions for {cache.k[0].shape[0]})"
            )
        logits = model.step(None, dup(seq_BN[:, have:P]), cache, cfg_doubled=use_cfg)  # predicts token P
    else:
        cache = model.new_cache(cond_in.shape[0], model.cls_token_num + N - 1) if kv_cache else None
        logits = model.step(cond_in, dup(seq_BN[:, :P]), cache, cfg_doubled=use_cfg)  # predicts token P
    for k in range(P, N):
        if k > P:
            if cache is not None:
                logits = model.step(None, dup(seq_BN[:, k - 1 : k]), cache, cfg_doubled=use_cfg)
            else:
                logits = model.step(cond_in, dup(seq_BN[:, :k]), None, cfg_doubled=use_cfg)
        if use_cfg:
            cond_l, uncond_l = logits.chunk(2)
            cfg_on = not (cfg_interval > -1 and k - 1 > cfg_interval)
            logits = uncond_l + (cond_l - uncond_l) * cfg_scale if cfg_on else cond_l
        if return_logits:
            step_logits.append(logits)
        seq_BN[:, k] = sample_logits(logits, temperature, top_k, top_p, greedy, generator)
    if return_logits:
        return seq_BN, torch.stack(step_logits, dim=1)
    return seq_BN
