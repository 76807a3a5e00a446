"""One interface over every IAR family: tokenize, decode, teacher forcing, generation, units, groups.

Token layout shared by all families: a *flat* token sequence of length N per image. For VAR it is the
concatenation of the scales' token maps (row-major, coarse to fine; 680 tokens for VAR-256); for the
next-token families it is the raster-order grid. ``logits[:, n]`` of `teacher_forced_logits` predicts
flat token n, and hooks report, for each sequence row, the flat token index it predicts
(`iarmem_core.models.hook_points.CallInfo.target_index`), so a position group is just a set of flat indices.

A family adapter (`adapters/var.py`, `adapters/rar.py`, `adapters/llamagen.py`) implements the
abstract methods; everything else (loading, groups, prefix choices, devices) lives here.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from iarmem_core import checkpoints
from iarmem_core.registry import ASSETS, ModelSpec

Tokens = Any  # VAR: list[LongTensor [B, pn*pn]] per scale; next-token: LongTensor [B, N]
DECODE_PRECISIONS = ("fp32", "bf16")  # of the tokenizer's decoder when it only feeds similarity images


def check_precision(precision: str) -> str:
    """`precision` if it is one of DECODE_PRECISIONS, else a ValueError naming the choices."""
    if precision not in DECODE_PRECISIONS:
        raise ValueError(f"decode precision must be one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}")
    return precision


def decode_memory_format(precision: str) -> torch.memory_format:
    """The layout a decoder's input gets at `precision`: channels-last for bf16 (oneDNN's and cuDNN's bf16
    convolutions are faster in it: the VAR-d16 decode 3.5 -> 2.6 s for 4 images on 2 CPU threads; the result
    moves within bf16 noise, which the attack's fp32 recheck covers), the plain layout for fp32 (unchanged)."""
    check_precision(precision)
    return torch.channels_last if precision == "bf16" else torch.contiguous_format


@contextlib.contextmanager
def decode_precision(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """Run a decoder in `precision`: fp32 as is; bf16 under autocast on `device` (convolutions and matmuls in
    bf16 on CPUs with AVX512-BF16 / AMX and on GPUs; GroupNorm and the other autocast fp32 ops stay fp32).

    Nothing of the model is modified (autocast casts per call), so a shared model stays fp32 for every
    other caller; token ids and teacher-forced logits never pass through here.
    """
    check_precision(precision)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available here: use 'auto' or 'cpu'")
    return dev


@dataclass(frozen=True)
class UnitSite:
    block: int
    module: str  # official module path of the MLP, e.g. "blocks.3.ffn" (VAR) or "layers.3.feed_forward"
    n_units: int
    hook: str  # canonical hook name, "blocks.3.mlp.hook_post"


@dataclass(frozen=True)
class PositionGroup:
    name: str  # "4x4" (VAR scale), "16x16" (next-token: all positions), "4x4/row2", "4x4/r2c3"
    kind: str  # "scale", "row" or "position"
    scale: int  # index of the scale (always 0 for next-token models)
    index: torch.Tensor  # LongTensor of flat token indices


class IARAdapter(ABC):
    """A loaded IAR: tokenizer + transformer, in eval mode, gradients off, on one device."""

    family: ClassVar[str]

    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: nn.Module,
        transformer: nn.Module,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        identity: dict | None = None,
    ):
        self.spec = spec
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.device = device
        self.dtype = dtype
        # what determines this model's outputs, for result-store keys
        self.identity = identity or {"name": spec.name, "weights": "random"}

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def build_tokenizer(cls, spec: ModelSpec) -> nn.Module:
        """A tokenizer module of `spec.tokenizer` (random or uninitialised weights; may be built on meta)."""

    @classmethod
    @abstractmethod
    def build_transformer(cls, spec: ModelSpec) -> nn.Module:
        """A transformer module of `spec.transformer` (may be built on meta)."""

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        transformer_path: str | os.PathLike | None = None,
        tokenizer_path: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> IARAdapter:
        """Build `spec` and load its weights.

        Paths default to the spec's bundled files (demo models). With no path at all the weights are
        random (seeded), which is what benchmarks and tests of full-size configs use.
        """
        dev = resolve_device(device)
        paths = {"transformer": transformer_path, "tokenizer": tokenizer_path}
        for comp in paths:
            if paths[comp] is None and spec.bundled.get(comp):
                paths[comp] = ASSETS.parent / spec.bundled[comp]
        modules: dict[str, nn.Module] = {}
        identity: dict = {"name": spec.name}
        for comp, builder in (("tokenizer", cls.build_tokenizer), ("transformer", cls.build_transformer)):
            path = paths[comp]
            if path is None:
                with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's global RNG is left as it was
                    torch.manual_seed(seed + (0 if comp == "tokenizer" else 1))
                    m = builder(spec)
                    cls.random_init(m)
                identity[comp] = f"random:{seed}"
            else:
                with torch.device("meta"):
                    m = builder(spec)
                # sizes and (safetensors) shapes are checked against the model before the tensors are read
                checkpoints.load_checked(m, path, expected=spec.name, component=comp)
                identity[comp] = f"{Path(path).name}:{checkpoints.file_fingerprint(path)}"
            init_np = getattr(m, "init_non_persistent", None)
            if init_np is not None:
                init_np()
            modules[comp] = m.to(dev, dtype=dtype).eval().requires_grad_(False)
        return cls(spec, modules["tokenizer"], modules["transformer"], dev, dtype, identity)

    @staticmethod
    def random_init(module: nn.Module) -> None:
        """Re-draw random weights after construction (families whose official init silences paths)."""
        return None

    # ---- layout ----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def token_grids(self) -> list[tuple[int, int]]:
        """(h, w) of each scale's token map; one entry for next-token models."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def scale_slices(self) -> list[slice]:
        out, start = [], 0
        for h, w in self.token_grids:
            out.append(slice(start, start + h * w))
            start += h * w
        return out

    @property
    def n_tokens(self) -> int:
        return sum(h * w for h, w in self.token_grids)

    @property
    def prefix_choices(self) -> list[int]:
        """Valid numbers of true prefix tokens for `generate` (VAR: whole scales only)."""
        if len(self.token_grids) > 1:
            return [0] + [s.stop for s in self.scale_slices[:-1]]
        return list(range(self.n_tokens))

    # ---- tokens ----------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, images_B3HW: torch.Tensor) -> Tokens:
        """Images in [0, 1] (any device) -> tokens."""

    @abstractmethod
    def decode(self, tokens: Tokens, precision: str = "fp32") -> torch.Tensor:
        """Tokens -> images [B, 3, H, W] in [0, 1] (float32); `precision` "bf16" runs the decoder under bf16
        autocast (`decode_precision`), for images that only feed a similarity."""

    def flatten(self, tokens: Tokens) -> torch.Tensor:
        """Tokens -> LongTensor [B, N] (VAR: scales concatenated)."""
        if isinstance(tokens, (list, tuple)):
            return torch.cat([t.reshape(t.shape[0], -1) for t in tokens], dim=1)
        return tokens

    def unflatten(self, flat_BN: torch.Tensor) -> Tokens:
        """LongTensor [B, N] -> tokens in the family's format."""
        if len(self.token_grids) > 1:
            return [flat_BN[:, s] for s in self.scale_slices]
        return flat_BN

    def reconstruct(self, images_B3HW: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """The tokenizer's reconstruction decode(tokenize(x)), the reference an extraction is compared with."""
        toks = self.tokenize(images_B3HW)
        return self.decode(toks) if precision == "fp32" else self.decode(toks, precision=precision)

    def decode_latent(self, latent: Any, precision: str = "fp32") -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from the `latent` of `generate_latent` (here: the tokens themselves)."""
        return self.decode(latent) if precision == "fp32" else self.decode(latent, precision=precision)

    def tokenizer_identity(self) -> dict:
        """What determines tokens and reconstructions, for result-store keys of cached tokens: the family, the
        tokenizer's weights (file fingerprint or random seed) and config, the image size and dtype, and any
        identity field beyond name/tokenizer/transformer (a subclass that changes `tokenize` marks itself
        there). The transformer is not part of it: models that share a tokenizer share its cache."""
        extra = {k: v for k, v in self.identity.items() if k not in ("name", "tokenizer", "transformer")}
        out = {
            "family": self.family,
            "tokenizer": self.identity.get("tokenizer"),
            "config": self.spec.tokenizer,
            "image_size": self.image_size,
            "dtype": str(self.dtype),
        }
        if extra:
            out["extra"] = extra
        if self.identity.get("tokenizer") is None:
            out["name"] = self.spec.name  # no weights identity: only the same model shares
        return out

    # ---- transformer ---------------------------------------------------------------------------
    @abstractmethod
    def teacher_forced_logits(self, tokens: Tokens, labels: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, V] with true tokens as input; no CFG, no dropout; [:, n] predicts flat token n.

        It follows the caller's grad mode (parameters never require grad; an attribution pass makes the unit
        activations require it), so analysis passes run it under torch.no_grad()."""

    @abstractmethod
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
    ) -> Tokens:
        """Generate tokens; the first `n_prefix` flat tokens are copied from `prefix` (teacher-forced).

        Greedy is ``top_k=1``. ``cfg`` follows the family's official schedule (VAR: linear ramp over
        scales; RAR: power-cosine with ``cfg_power``; LlamaGen: constant, ``cfg_interval``); 0 disables
        CFG (no batch doubling). ``seed`` makes sampling reproducible. ``kv_cache=False`` recomputes the
        whole prefix at every step (same tokens, slower; for benchmarks and checks).
        """

    def generate_latent(self, labels: torch.Tensor, **kw: Any) -> tuple[Tokens, Any]:
        """`generate(labels, **kw)` plus what `decode_latent` turns into the images: (tokens, latent).

        Next-token families: the latent is the tokens. VAR: its final f_hat (the generation builds it anyway;
        decoding it skips rebuilding it from the ids and gives the same image, see `VARAdapter`).
        """
        toks = self.generate(labels, **kw)
        return toks, toks

    def generate_prefixes(
        self,
        labels: torch.Tensor,
        tokens: Tokens,
        prefixes: Sequence[int],
        seeds: Sequence[int],
        kv_cache: bool = True,
        **kw: Any,
    ) -> list[tuple[Tokens, Any]]:
        """`generate_latent` from each prefix length of a sweep (prefix 0: no prefix), with seed `seeds[i]` for
        `prefixes[i]`: [(tokens, latent)] in that order. A family with `_prefill` (RAR, LlamaGen) computes the
        rows of the longest prefix once and starts every prefix >= 1 from a copy of them (`_generate_cached`;
        the same tokens as a prefill each: causal rows do not depend on later rows); VAR generates each (its
        prefixes are whole scales, a prefill of at most 30 rows)."""
        nonzero = [p for p in prefixes if p]
        if not kv_cache or len(nonzero) < 2 or type(self)._prefill is IARAdapter._prefill:
            return [
                self.generate_latent(labels, prefix=tokens if p else None, n_prefix=p, seed=s, kv_cache=kv_cache, **kw)
                for p, s in zip(prefixes, seeds, strict=True)
            ]
        with torch.no_grad():
            shared = self._prefill(labels, tokens, max(nonzero), **kw)
            out = []
            for p, s in zip(prefixes, seeds, strict=True):
                toks = self._generate_cached(labels, tokens if p else None, p, s, shared if p else None, **kw)
                out.append((toks, toks))
        return out

    def _prefill(self, labels: torch.Tensor, tokens: Tokens, n_prefix: int, **kw: Any) -> Any:
        """The KV cache of the rows before the last of `n_prefix` true tokens (next-token families)."""
        raise NotImplementedError

    def _generate_cached(
        self, labels: torch.Tensor, prefix: Tokens | None, n_prefix: int, seed: int, shared: Any, **kw: Any
    ) -> Tokens:
        """`generate` with KV cache, starting from the rows of `shared` (a `_prefill`) that precede prefix
        `n_prefix` (None: a plain generate)."""
        raise NotImplementedError

    def check_prefix(self, n_prefix: int) -> None:
        if n_prefix not in self.prefix_choices and n_prefix != 0:
            if len(self.token_grids) > 1:
                raise ValueError(
                    f"{self.spec.name}: a prefix must be whole scales, i.e. one of {self.prefix_choices} tokens "
                    f"(got {n_prefix})"
                )
            raise ValueError(f"{self.spec.name}: prefix must be in [0, {self.n_tokens - 1}] tokens (got {n_prefix})")

    # ---- units and groups ------------------------------------------------------------------------
    @abstractmethod
    def unit_sites(self) -> list[UnitSite]:
        """One site per transformer block: the MLP whose fc2/w2 input holds the units."""

    @property
    def n_blocks(self) -> int:
        return len(self.unit_sites())

    @property
    def n_units(self) -> int:
        """Units per block (the same in every block of these architectures)."""
        return self.unit_sites()[0].n_units

    def position_groups(
        self, kinds: Sequence[str] = ("scale",), scales: Sequence[int] | None = None
    ) -> list[PositionGroup]:
        """Groups of flat token indices.

        ``"scale"``: one per scale (next-token: one group with all positions); ``"row"``: each row of the
        token grid of the chosen `scales` (default all); ``"position"``: each token of those scales.
        """
        out: list[PositionGroup] = []
        sel = range(len(self.token_grids)) if scales is None else scales
        for kind in kinds:
            if kind not in ("scale", "row", "position"):
                raise ValueError(f"unknown position-group kind {kind!r}: expected scale, row or position")
            for si in sel:
                h, w = self.token_grids[si]
                start = self.scale_slices[si].start
                base = f"{h}x{w}"
                if kind == "scale":
                    out.append(PositionGroup(base, "scale", si, torch.arange(start, start + h * w)))
                elif kind == "row":
                    for r in range(h):
                        idx = torch.arange(start + r * w, start + (r + 1) * w)
                        out.append(PositionGroup(f"{base}/row{r}", "row", si, idx))
                else:
                    for r in range(h):
                        for c in range(w):
                            idx = torch.tensor([start + r * w + c])
                            out.append(PositionGroup(f"{base}/r{r}c{c}", "position", si, idx))
        return out

    # ---- misc ------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """A JSON-able summary for model cards and the app."""
        return {
            "name": self.spec.name,
            "family": self.family,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "token_grids": [list(g) for g in self.token_grids],
            "n_tokens": self.n_tokens,
            "vocab_size": self.vocab_size,
            "blocks": self.n_blocks,
            "units_per_block": self.n_units,
            "transformer_params": sum(p.numel() for p in self.transformer.parameters()),
            "tokenizer_params": sum(p.numel() for p in self.tokenizer.parameters()),
            "device": str(self.device),
            "weights": self.identity,
        }

    def _labels(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)

    def _images(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        x = images_B3HW.to(self.device, self.dtype)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {list(x.shape)}")
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"{self.spec.name} takes {self.image_size}x{self.image_size} images, got {x.shape[-2]}x{x.shape[-1]}"
            )
        return x
