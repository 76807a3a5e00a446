"""LlamaGen (class-conditional GPT + VQ-16) behind the common IAR interface.

Tokens are the raster-order grid [B, N] (N = g*g, g = image_size / 16 for VQ-16). ``generate`` follows the
official sampler (``autoregressive/models/generate.py``): ``cfg`` is ``cfg_scale`` and, as there, guidance
(and batch doubling) happens only when ``cfg > 1``; the family keyword ``cfg_interval`` (default -1: always)
turns guidance off after that many decode steps. ``top_k=1`` is greedy; ``top_k=0`` and ``top_p`` outside
(0, 1) mean no filtering.

Example:
    >>> from iarmem_core.adapters import load_adapter
    >>> m = load_adapter("test-llamagen", device="cpu")
    >>> ids_BN = m.generate([3, 7], cfg=4.0, top_k=1)        # [2, 36]
    >>> imgs_B3HW = m.decode(ids_BN)                          # [2, 3, 12, 12] in [0, 1]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from iarmem_core.adapters.base import IARAdapter, Tokens, UnitSite, decode_memory_format, decode_precision
from iarmem_core.models import llamagen as gpt_lib
from iarmem_core.models.llamagen import Transformer
from iarmem_core.models.vq import VQModel
from iarmem_core.registry import ModelSpec


class LlamaGenAdapter(IARAdapter):
    family = "llamagen"
    tokenizer: VQModel
    transformer: Transformer

    @classmethod
    def build_tokenizer(cls, spec: ModelSpec) -> nn.Module:
        return VQModel(**spec.tokenizer)

    @classmethod
    def build_transformer(cls, spec: ModelSpec) -> nn.Module:
        tr = Transformer(**spec.transformer)
        vq_ds = 2 ** (len(spec.tokenizer.get("encoder_ch_mult", (1, 1, 2, 2, 4))) - 1)
        if spec.image_size // vq_ds != tr.grid:
            raise ValueError(
                f"{spec.name}: {spec.image_size} px images give a {spec.image_size // vq_ds}-token grid "
                f"with this tokenizer, but block_size {tr.block_size} is a {tr.grid}x{tr.grid} grid"
            )
        return tr

    @staticmethod
    def random_init(module: nn.Module) -> None:
        # The official init zeroes the output head, which would make a random model emit one constant token.
        if isinstance(module, Transformer):
            nn.init.normal_(module.output.weight, 0.0, module.initializer_range)

    # ---- layout ----------------------------------------------------------------------------------
    @property
    def token_grids(self) -> list[tuple[int, int]]:
        g = self.transformer.grid
        return [(g, g)]

    @property
    def vocab_size(self) -> int:
        return self.transformer.vocab_size

    # ---- tokens ----------------------------------------------------------------------------------
    @torch.no_grad()
    def tokenize(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> token ids [B, N] (int64, raster order)."""
        return self.tokenizer.encode(self._images(images_B3HW) * 2 - 1)

    @torch.no_grad()
    def decode(self, tokens: Tokens, precision: str = "fp32") -> torch.Tensor:
        """Token ids [B, N] -> images [B, 3, H, W] in [0, 1] (float32; `precision` bf16: decoder under autocast)."""
        idx_BN = self._tokens(tokens)
        g = self.transformer.grid
        with decode_precision(self.device, precision):
            shape = (idx_BN.shape[0], self.tokenizer.codebook_embed_dim, g, g)
            img = self.tokenizer.decode_code(idx_BN, shape, decode_memory_format(precision))
        return ((img.float() + 1) / 2).clamp(0, 1)

    # ---- transformer ---------------------------------------------------------------------------
    def teacher_forced_logits(self, tokens: Tokens, labels: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, V] (float32); [:, n] predicts token n from the class and tokens < n."""
        idx_BN = self._tokens(tokens)
        labels_B = self._check_labels(labels, idx_BN.shape[0])
        return self.transformer(idx_BN[:, :-1], labels_B)[0]

    def generate(
        self,
        labels: torch.Tensor,
        prefix: Tokens | None = None,
        n_prefix: int = 0,
        cfg: float = 0.0,
        top_k: int = 1,
        top_p: float = 0.0,
        temperature: float = 1.0,
        seed: int = 0,
        kv_cache: bool = True,
        **family_kw: Any,
    ) -> torch.Tensor:
        """Token ids [B, N] (int64); see the module docstring for the CFG, top-k and top-p conventions."""
        return gpt_lib.generate(
            **self._generate_kw(labels, prefix, n_prefix, cfg, top_k, top_p, temperature, seed, kv_cache, **family_kw)
        )

    def _prefill(self, labels, tokens, n_prefix, **kw):
        g = self._generate_kw(labels, tokens, n_prefix, **kw)
        return gpt_lib.prefill(self.transformer, g["cond_B"], g["prefix_BP"], g["cfg_scale"])

    def _generate_cached(self, labels, prefix, n_prefix, seed, shared, **kw):
        g = self._generate_kw(labels, prefix, n_prefix, seed=seed, **kw)
        cache = None if shared is None else shared.truncated(self.transformer.cls_token_num + n_prefix - 1)
        return gpt_lib.generate(**g, cache=cache)

    def _generate_kw(
        self,
        labels,
        prefix=None,
        n_prefix: int = 0,
        cfg: float = 0.0,
        top_k: int = 1,
        top_p: float = 0.0,
        temperature: float = 1.0,
        seed: int = 0,
        kv_cache: bool = True,
        **family_kw: Any,
    ) -> dict:
        """The arguments of `llamagen.generate` for `generate`'s (checked)."""
        family_kw = dict(family_kw)
        cfg_interval = family_kw.pop("cfg_interval", -1)
        if family_kw:
            raise TypeError(f"LlamaGen generate got unknown options {sorted(family_kw)}; it takes cfg_interval")
        labels_B = self._check_labels(labels)
        self.check_prefix(n_prefix)
        prefix_BP = None
        if n_prefix:
            if prefix is None:
                raise ValueError(f"n_prefix={n_prefix} needs `prefix` tokens")
            prefix_BN = self._tokens(prefix)
            if prefix_BN.shape[0] != labels_B.shape[0] or prefix_BN.shape[1] < n_prefix:
                raise ValueError(
                    f"prefix must be [{labels_B.shape[0]}, >={n_prefix}] tokens, got {list(prefix_BN.shape)}"
                )
            prefix_BP = prefix_BN[:, :n_prefix]
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k filtering, 1: greedy), got {top_k}")
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        return {
            "model": self.transformer,
            "cond_B": labels_B,
            "prefix_BP": prefix_BP,
            "cfg_scale": float(cfg),
            "cfg_interval": cfg_interval,
            "temperature": temperature,
            "top_k": int(top_k),
            "top_p": top_p if 0.0 < top_p < 1.0 else 1.0,
            "greedy": top_k == 1,
            "generator": gen,
            "kv_cache": kv_cache,
        }

    # ---- units -----------------------------------------------------------------------------------
    def unit_sites(self) -> list[UnitSite]:
        n = self.transformer.ffn_hidden
        return [
            UnitSite(i, f"layers.{i}.feed_forward", n, f"blocks.{i}.mlp.hook_post")
            for i in range(self.transformer.n_layer)
        ]

    # ---- helpers ---------------------------------------------------------------------------------
    def _tokens(self, tokens: Tokens) -> torch.Tensor:
        idx_BN = self.flatten(tokens).to(self.device, torch.long)
        if idx_BN.ndim != 2:
            raise ValueError(f"expected token ids [B, N], got shape {list(idx_BN.shape)}")
        if idx_BN.numel() and (int(idx_BN.min()) < 0 or int(idx_BN.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size - 1}], got [{int(idx_BN.min())}, {int(idx_BN.max())}]"
            )
        return idx_BN

    def _check_labels(self, labels: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        labels_B = self._labels(labels)
        n_rows = self.transformer.cls_embedding.embedding_table.num_embeddings  # num_classes (+1: null class)
        if labels_B.numel() and (int(labels_B.min()) < 0 or int(labels_B.max()) >= n_rows):
            raise ValueError(
                f"class labels must be in [0, {self.num_classes - 1}]"
                f"{f' (or {self.num_classes}: the null class)' if n_rows > self.num_classes else ''}, "
                f"got {labels_B.tolist()[:8]}"
            )
        if batch is not None and labels_B.shape[0] != batch:
            raise ValueError(f"{labels_B.shape[0]} labels for {batch} token sequences")
        return labels_B
