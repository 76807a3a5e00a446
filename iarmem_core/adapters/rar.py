"""RAR behind the common IAR interface: MaskGIT-VQGAN tokens on a square grid, read in raster order.

Labels are raw class ids (-1 = the null class); the adapter maps them into RAR's token space. Teacher
forcing is raster order (what UnitMem and the memorization score use); `permuted_logits` gives RAR's
training-time view for any token order. `generate` follows the official sampler: guidance_scale `cfg`
with the power-cosine schedule (`cfg_power`), temperature, plus top-k / top-p and greedy (top_k=1).

Example:
    >>> from iarmem_core.adapters import load_adapter
    >>> m = load_adapter("test-rar", device="cpu")        # random weights
    >>> toks_BN = m.tokenize(torch.rand(2, 3, 12, 12))    # [2, 36]
    >>> logits_BNV = m.teacher_forced_logits(toks_BN, torch.tensor([3, 7]))   # [2, 36, 128]
    >>> gen_BN = m.generate(torch.tensor([0, 9]), cfg=4.0, cfg_power=0.0, top_k=1)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from iarmem_core.adapters.base import IARAdapter, UnitSite, decode_memory_format, decode_precision
from iarmem_core.models.maskgit_vqgan import MaskGITVQGAN
from iarmem_core.models.rar import RAR
from iarmem_core.registry import ModelSpec


class RARAdapter(IARAdapter):
    """RAR-B/L/XL/XXL (and tiny test configs) with the MaskGIT-VQGAN tokenizer."""

    family = "rar"
    tokenizer: MaskGITVQGAN
    transformer: RAR

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def build_tokenizer(cls, spec: ModelSpec) -> nn.Module:
        return MaskGITVQGAN(**spec.tokenizer)

    @classmethod
    def build_transformer(cls, spec: ModelSpec) -> nn.Module:
        """RAR of `spec`; off meta the weights stay uninitialised (random_init or a checkpoint fills them)."""
        device = torch.get_default_device()
        if device.type == "meta":
            return RAR(**spec.transformer)
        # Skipping the official init saves most of the build time of a full-size model; every parameter is
        # overwritten next anyway.
        with torch.device("meta"):
            model = RAR(**spec.transformer).to_empty(device=device)
        model.init_non_persistent()  # the causal mask must not stay uninitialised memory
        return model

    @staticmethod
    def random_init(module: nn.Module) -> None:
        """Random weights that exercise every path (the official init would leave them degenerate).

        RAR: adaLN-zero makes every block an identity, so the generator gets `RAR.randomize_`. Tokenizer:
        the official codebook init (uniform +-1/V) sits far inside the encoder's output cloud, so every
        position would pick the same code; the codebook is redrawn as N(0, 1) times the std of the
        encoder's output on a fixed random image (at most 64 px).
        """
        if isinstance(module, RAR):
            module.randomize_()
        elif isinstance(module, MaskGITVQGAN):
            with torch.no_grad():
                side = min(module.resolution, 64)  # the conv stack is size-agnostic; a small probe is enough
                probe = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
                std = float(module.encoder(probe).std())
                emb = module.quantize.embedding.weight
                emb.copy_(torch.randn(emb.shape) * std)

    # ---- layout ----------------------------------------------------------------------------------
    @property
    def token_grids(self) -> list[tuple[int, int]]:
        n = self.transformer.image_seq_len
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{self.spec.name}: image_seq_len {n} is not a square grid")
        return [(side, side)]

    @property
    def vocab_size(self) -> int:
        return self.transformer.codebook_size

    # ---- tokens ----------------------------------------------------------------------------------
    @torch.no_grad()
    def tokenize(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> token ids [B, N] (MaskGIT-VQGAN works in [0, 1]: no rescaling)."""
        return self.tokenizer.encode(self._images(images_B3HW))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Token ids [B, N] -> images [B, 3, H, W] in [0, 1] (`precision` bf16: the decoder under autocast)."""
        toks = self._tokens(tokens)
        with decode_precision(self.device, precision):
            return self.tokenizer.decode(toks, decode_memory_format(precision)).float()

    def _tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.flatten(tokens).to(self.device, torch.long)
        if t.ndim != 2 or t.shape[1] != self.n_tokens:
            raise ValueError(f"{self.spec.name}: expected tokens [B, {self.n_tokens}], got {list(t.shape)}")
        return t

    # ---- transformer ---------------------------------------------------------------------------
    def teacher_forced_logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, V] in raster order; [:, n] predicts token n. No CFG, no label dropout, eval mode."""
        toks_BN = self._tokens(tokens)
        cond_B = self.transformer.preprocess_condition(self._labels(labels))
        return self.transformer.forward_fn(toks_BN, cond_B)[:, :-1].float()

    @torch.no_grad()
    def permuted_logits(
        self, tokens: torch.Tensor, labels: torch.Tensor, orders_BN: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RAR's training view in token order `orders_BN` [B, N]: (logits [B, N, V], targets [B, N]).

        logits[:, k] predicts targets[:, k] = tokens[:, orders[:, k]].
        """
        toks_BN = self._tokens(tokens)
        orders = torch.as_tensor(orders_BN, dtype=torch.long, device=self.device)
        if orders.ndim == 1:
            orders = orders.expand(toks_BN.shape[0], -1)
        ref = torch.arange(self.n_tokens, device=self.device).expand_as(orders)
        if orders.shape != toks_BN.shape or not torch.equal(orders.sort(dim=1).values, ref):
            raise ValueError(
                f"orders must be one permutation of 0..{self.n_tokens - 1} per image, "
                f"shape {list(toks_BN.shape)}; got shape {list(orders.shape)}"
            )
        cond_B = self.transformer.preprocess_condition(self._labels(labels))
        logits, targets = self.transformer.forward_fn(toks_BN, cond_B, return_labels=True, orders_BN=orders)
        return logits[:, :-1].float(), targets

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        prefix: torch.Tensor | None = None,
        n_prefix: int = 0,
        cfg: float = 0.0,
        top_k: int = 1,
        top_p: float = 0.0,
        temperature: float = 1.0,
        seed: int = 0,
        kv_cache: bool = True,
        **family_kw: Any,
    ) -> torch.Tensor:
        """Token ids [B, N]. `cfg` is RAR's guidance_scale (0: no CFG, no batch doubling).

        Family keyword: ``cfg_power`` (guidance_scale_pow; default the spec's published value, 0 when it has
        none; 0 gives a constant scale). Greedy is top_k=1; the first n_prefix tokens come from `prefix`.
        """
        return self.transformer.generate(
            **self._generate_kw(labels, prefix, n_prefix, cfg, top_k, top_p, temperature, seed, kv_cache, **family_kw)
        )

    def _prefill(self, labels, tokens, n_prefix, **kw):
        g = self._generate_kw(labels, tokens, n_prefix, **kw)
        return self.transformer.prefill(g["labels_B"], g["prefix_BP"], g["guidance_scale"])

    def _generate_cached(self, labels, prefix, n_prefix, seed, shared, **kw):
        g = self._generate_kw(labels, prefix, n_prefix, seed=seed, **kw)
        cache = None if shared is None else shared.truncated(self.transformer.PREFIX + n_prefix - 1)
        return self.transformer.generate(**g, cache=cache)

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
        """The arguments of `RAR.generate` for `generate`'s (checked)."""
        unknown = set(family_kw) - {"cfg_power"}
        if unknown:
            raise TypeError(
                f"RAR generate got unknown keyword(s) {sorted(unknown)}; the only family keyword is cfg_power"
            )
        cfg_power = family_kw.get("cfg_power")
        if cfg_power is None:
            cfg_power = float(self.spec.sampling.get("cfg_power", 0.0))
        labels_B = self._labels(labels)
        self.check_prefix(n_prefix)
        prefix_BP = None
        if n_prefix > 0:
            if prefix is None:
                raise ValueError(f"n_prefix={n_prefix} needs prefix tokens [B, >= {n_prefix}]")
            p = self.flatten(prefix).to(self.device, torch.long)
            if p.ndim != 2 or p.shape[0] != labels_B.shape[0] or p.shape[1] < n_prefix:
                raise ValueError(f"prefix must be [B={labels_B.shape[0]}, >= {n_prefix}] tokens, got {list(p.shape)}")
            prefix_BP = p[:, :n_prefix]
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        return {
            "labels_B": labels_B,
            "guidance_scale": float(cfg),
            "guidance_scale_pow": float(cfg_power),
            "temperature": float(temperature),
            "top_k": int(top_k),
            "top_p": float(top_p),
            "prefix_BP": prefix_BP,
            "generator": gen,
            "kv_cache": kv_cache,
        }

    # ---- units -----------------------------------------------------------------------------------
    def unit_sites(self) -> list[UnitSite]:
        return [
            UnitSite(i, f"blocks.{i}.mlp", blk.mlp.fc1.out_features, f"blocks.{i}.mlp.hook_post")
            for i, blk in enumerate(self.transformer.blocks)
        ]
