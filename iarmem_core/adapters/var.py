"""The VAR family behind the common adapter interface: multi-scale VQVAE + next-scale transformer.

Tokens are a list of per-scale id maps ``[B, pn*pn]`` (coarse to fine); the flat token index n runs over
the concatenated scales (680 for VAR-256), so the position groups are the scales.

Example:
    >>> from iarmem_core.adapters import load_adapter
    >>> m = load_adapter("test-var")
    >>> toks = m.generate(torch.tensor([3, 7]), cfg=1.5, top_k=1)   # greedy, official CFG ramp
    >>> imgs = m.decode_progressive(toks)                            # one image per scale
    >>> toks, f_hat = m.generate_latent(torch.tensor([3, 7]))      # ... and the final f_hat
    >>> imgs = m.decode_latent(f_hat)                                # == m.decode(toks), bit for bit
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from iarmem_core.adapters.base import IARAdapter, Tokens, UnitSite, decode_memory_format, decode_precision
from iarmem_core.models.var import VAR
from iarmem_core.models.vqvae_ms import VQVAE
from iarmem_core.registry import ModelSpec

_EMBEDDINGS = ("pos_start", "pos_1LC", "class_emb.weight", "lvl_embed.weight")


class VARAdapter(IARAdapter):
    family = "var"
    tokenizer: VQVAE
    transformer: VAR

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def build_tokenizer(cls, spec: ModelSpec) -> VQVAE:
        return VQVAE(**spec.tokenizer, test_mode=True)

    @classmethod
    def build_transformer(cls, spec: ModelSpec) -> VAR:
        tok = spec.tokenizer
        return VAR(vocab_size=tok["vocab_size"], Cvae=tok["z_channels"], **spec.transformer)

    @staticmethod
    @torch.no_grad()
    def random_init(module: nn.Module) -> None:
        """Random weights that exercise every path (the rule of the golden data, not the official init).

        The official init scales the AdaLN gammas by 1e-5 and the head by 0.02, so random-weight tests
        would barely see the blocks. Linear/conv weights N(0, 1/fan_in), norm weights 1 + 0.1 N, other
        1-D parameters 0.1 N, embeddings 0.5 N, attention scales ln 4 + 0.3 N; the VQVAE codebook is
        N(0, 1) times the std of the encoder features (measured on a small random image).
        """
        for name, p in module.named_parameters():
            if name in _EMBEDDINGS:
                p.normal_(0, 0.5)
            elif name.endswith("scale_mul_1H11"):
                p.normal_(0, 0.3).add_(math.log(4.0))
            elif name == "quantize.embedding.weight":
                continue
            elif p.ndim >= 2:
                p.normal_(0, (p.numel() // p.shape[0]) ** -0.5)
            elif name.endswith("weight"):
                p.normal_(0, 0.1).add_(1.0)
            else:
                p.normal_(0, 0.1)
        if isinstance(module, VQVAE):
            side = 2 * module.downsample  # the encoder is convolutional: a small image gives the feature scale
            f = module.img_to_f(torch.rand(1, 3, side, side, device=module.quant_conv.weight.device) * 2 - 1)
            module.quantize.embedding.weight.normal_(0, 1).mul_(f.std())

    # ---- layout ----------------------------------------------------------------------------------
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.transformer.patch_nums

    @property
    def token_grids(self) -> list[tuple[int, int]]:
        return [(pn, pn) for pn in self.patch_nums]

    @property
    def vocab_size(self) -> int:
        return self.transformer.V

    # ---- tokens ----------------------------------------------------------------------------------
    def _token_list(self, tokens: Tokens) -> list[torch.Tensor]:
        if isinstance(tokens, torch.Tensor):
            if tokens.ndim != 2 or tokens.shape[1] > self.n_tokens:
                raise ValueError(f"expected flat tokens [B, <= {self.n_tokens}], got {list(tokens.shape)}")
            tokens = [tokens[:, s] for s in self.scale_slices if s.stop <= tokens.shape[1]]
        out = []
        for si, t in enumerate(tokens):
            pn = self.patch_nums[si]
            out.append(t.to(self.device).reshape(t.shape[0], pn * pn).long())
        return out

    @torch.no_grad()
    def tokenize(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] -> per-scale ids, a list of [B, pn*pn] LongTensors."""
        return self.tokenizer.img_to_idxBl(self._images(images_B3HW) * 2 - 1)

    @torch.no_grad()
    def decode(self, tokens: Tokens, precision: str = "fp32") -> torch.Tensor:
        """All scales' ids -> images [B, 3, H, W] in [0, 1] (f_hat rebuilt from the ids, then the decoder)."""
        toks = self._token_list(tokens)
        if len(toks) != len(self.patch_nums):
            raise ValueError(f"decode needs all {len(self.patch_nums)} scales, got {len(toks)}")
        quant = self.tokenizer.quantize
        return self.decode_latent(quant.embed_to_fhat(quant.idxBl_to_h(toks), last_one=True), precision)

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """The final f_hat [B, Cvae, h, w] (from `generate_latent`) -> images [B, 3, H, W] in [0, 1].

        `generate` accumulates f_hat exactly as `embed_to_fhat` rebuilds it from the ids (zeros, then
        + Phi(up(h_si)) scale by scale, in the same dtype), so decode_latent(f_hat) == decode(ids) bit for bit.
        """
        if latent.ndim != 4 or latent.shape[1] != self.tokenizer.Cvae:
            raise ValueError(f"expected f_hat [B, {self.tokenizer.Cvae}, h, w], got {list(latent.shape)}")
        latent = latent.to(self.device).contiguous(memory_format=decode_memory_format(precision))
        with decode_precision(self.device, precision):
            img = self.tokenizer.fhat_to_img(latent)
        return self._to01(img if precision == "fp32" else img.float())  # bf16: rescale in fp32

    @torch.no_grad()
    def decode_progressive(self, tokens: Tokens) -> list[torch.Tensor]:
        """Ids of the first k scales -> k images [B, 3, H, W] in [0, 1]: the image after each scale."""
        imgs = self.tokenizer.idxBl_to_img(self._token_list(tokens), same_shape=True, last_one=False)
        return [self._to01(x) for x in imgs]

    @staticmethod
    def _to01(x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) * 0.5).float().clamp(0, 1)  # the VQVAE works in [-1, 1]

    # ---- transformer ---------------------------------------------------------------------------
    def teacher_forced_logits(self, tokens: Tokens, labels: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, V]: [:, n] predicts flat token n, from the true tokens of the coarser scales."""
        toks = self._token_list(tokens)
        if len(toks) != len(self.patch_nums):
            raise ValueError(f"teacher forcing needs all {len(self.patch_nums)} scales, got {len(toks)}")
        x_BLCv = self.tokenizer.quantize.idxBl_to_var_input(toks)
        self.transformer.eval()  # no label dropout, no drop-path
        return self.transformer(self._labels(labels), x_BLCv)

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor | Sequence[int],
        prefix: Tokens | None = None,
        n_prefix: int = 0,
        cfg: float = 0.0,
        top_k: int = 1,
        top_p: float = 0.0,
        temperature: float = 1.0,
        seed: int = 0,
        kv_cache: bool = True,
        **family_kw: Any,
    ) -> list[torch.Tensor]:
        """Generate per-scale ids; the first `n_prefix` flat tokens (whole scales) come from `prefix`.

        CFG follows VAR's linear ramp t = cfg * si / (S-1); ``top_k=1`` is greedy. Sampling uses a
        torch.Generator seeded with `seed` on the model's device, as the official `g_seed`.
        """
        return self.generate_latent(
            labels, prefix, n_prefix, cfg, top_k, top_p, temperature, seed, kv_cache, **family_kw
        )[0]

    @torch.no_grad()
    def generate_latent(
        self,
        labels: torch.Tensor | Sequence[int],
        prefix: Tokens | None = None,
        n_prefix: int = 0,
        cfg: float = 0.0,
        top_k: int = 1,
        top_p: float = 0.0,
        temperature: float = 1.0,
        seed: int = 0,
        kv_cache: bool = True,
        **family_kw: Any,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`generate` plus its final f_hat [B, Cvae, h, w]: (per-scale ids, f_hat) for `decode_latent`."""
        if family_kw:
            raise TypeError(f"VAR generate got unknown options {sorted(family_kw)}")
        self.check_prefix(n_prefix)
        lab = self._labels(labels)
        P = 0 if n_prefix == 0 else [s.stop for s in self.scale_slices].index(n_prefix) + 1
        prefix_list = None
        if P:
            if prefix is None:
                raise ValueError(f"n_prefix={n_prefix} needs the prefix tokens")
            prefix_list = self._token_list(prefix)[:P]
            if len(prefix_list) < P or prefix_list[0].shape[0] != lab.shape[0]:
                raise ValueError(f"prefix must hold the first {P} scales for {lab.shape[0]} images")
        rng = torch.Generator(device=self.device)
        rng.manual_seed(int(seed))
        self.transformer.eval()
        return self.transformer.generate(
            self.tokenizer,
            lab,
            cfg=cfg,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            rng=rng,
            prefix_idx_Bl=prefix_list,
            kv_cache=kv_cache,
        )

    # ---- units -----------------------------------------------------------------------------------
    def unit_sites(self) -> list[UnitSite]:
        return [
            UnitSite(
                block=i,
                module=f"blocks.{i}.ffn",
                n_units=b.ffn.fc1.out_features,
                hook=f"blocks.{i}.mlp.hook_post",
            )
            for i, b in enumerate(self.transformer.blocks)
        ]
