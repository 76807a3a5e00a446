"""Model FLOPs of a workload, and the machine's measured peak, so every timing is also a fraction of the limit.

FLOPs are counted, not estimated: the model's own code runs on PyTorch's ``meta`` device (shapes only, no
memory, no arithmetic) with the formulas of `torch.utils.flop_counter` (FlopCounterMode's), which add up every matmul,
convolution and attention kernel (2 FLOPs per multiply-add; SDPA as two matmuls over the full score matrix,
masked or not). Elementwise work (norms, activations, interpolation, sampling) is not counted, as usual for
model FLOPs. A count takes milliseconds even for VAR-d16 and is linear in the batch.

`transformer_flops_estimate` is the textbook formula, 2 x (per-token weights) x rows + 4 x rows x keys x width
per block, a cross-check of the counts (tests/test_flops.py: within 5% on teacher forcing).

`measure_peak(device, dtype)` times a large square matmul in this process (same threads, same load), the
practical limit of dense arithmetic here; `fraction(flops, seconds, peak)` puts a timing against it.

Example:
    >>> from iarmem_core import flops
    >>> f = flops.generate_flops("var-d16", batch=16, prefix=30)       # greedy, KV cache, no CFG
    >>> peak = flops.measure_peak("cpu")                                 # {"flops_per_s": ..., ...}
    >>> flops.fraction(f, seconds=60.0, peak=peak)["fraction_of_peak"]
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from iarmem_core.adapters import adapter_class
from iarmem_core.adapters.base import IARAdapter, resolve_device
from iarmem_core.models import linear as linear_mod
from iarmem_core.registry import get_spec

META = torch.device("meta")


@functools.lru_cache(maxsize=8)
def meta_adapter(name: str) -> IARAdapter:
    """Registry model `name` built on the meta device (no weights in memory), for counting."""
    spec = get_spec(name)
    cls = adapter_class(spec.family)
    with torch.device("meta"):
        tok, tr = cls.build_tokenizer(spec), cls.build_transformer(spec)
        init_np = getattr(tr, "init_non_persistent", None)
        if init_np is not None:
            init_np()
    return cls(spec, tok.eval(), tr.eval(), META)


def _sdpa_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    """QK^T and AV over the full score matrix: 2 B H Lq Lk (Dqk + Dv)."""
    b, h, lq, d = q.shape
    return 2 * b * h * lq * k.shape[-2] * (d + v.shape[-1])


def _onednn_linear_flops(x, w, *args, out_val=None, **kwargs) -> int:
    """oneDNN's fp32 linear (`iarmem_core.models.linear`): 2 x rows x in x out, as addmm."""
    return 2 * (x.numel() // x.shape[-1]) * x.shape[-1] * w.shape[0]


# kernels torch's registry has no formula for (CPU attention; meta tensors take the math path: bmm)
_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _EXTRA[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops  # the unary overload is the one called


class _Counter(TorchDispatchMode):
    """Adds up the FLOPs of every aten op that torch's flop counter has a formula for (FlopCounterMode's
    registry, without its per-module bookkeeping, which makes long generation loops slow to count)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket) or _EXTRA.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count(fn, *args, **kwargs) -> int:
    """FLOPs of `fn(*args, **kwargs)` (run it on meta tensors to count without computing). Inference mode is
    switched off inside: under it the dispatch mode would see no ops."""
    with torch.inference_mode(False), torch.no_grad(), _Counter() as c:
        fn(*args, **kwargs)
    return c.total


def _tokens(m: IARAdapter, batch: int):
    flat = torch.zeros(batch, m.n_tokens, dtype=torch.long, device=META)
    return m.unflatten(flat), flat


# Every counted kernel's work is proportional to the batch, so each workload is counted once for one image
# (cached per process) and scaled: counting a next-token generation on meta still runs its Python loop
# (seconds for RAR-B's 256 steps).
def tokenize_flops(name: str, batch: int = 1) -> int:
    """Encoder (+ quantiser distances) of `batch` images."""
    return batch * _tokenize_1(name)


def decode_flops(name: str, batch: int = 1) -> int:
    """Decoder of `batch` images (VAR: from f_hat; rebuilding it from the ids adds no counted FLOPs)."""
    return batch * _decode_1(name)


def teacher_forced_flops(name: str, batch: int = 1) -> int:
    """One teacher-forced forward over every token of `batch` images (the scoring / UnitMem pass)."""
    return batch * _teacher_forced_1(name)


def generate_flops(name: str, batch: int = 1, prefix: int = 0, cfg: float = 0.0, kv_cache: bool = True) -> int:
    """Greedy generation of `batch` images after `prefix` true tokens (VAR: whole scales), as the attack runs it;
    ``cfg`` != 0 doubles the batch as the samplers do."""
    return batch * _generate_1(name, int(prefix), float(cfg), bool(kv_cache))


def generate_prefixes_flops(
    name: str, batch: int, prefixes: Sequence[int], cfg: float = 0.0, kv_cache: bool = True
) -> int:
    """`IARAdapter.generate_prefixes` of `batch` images: a generation from each prefix; the next-token
    families compute the prefix rows once, in one prefill of the longest prefix."""
    return batch * _generate_prefixes_1(name, tuple(int(p) for p in prefixes), float(cfg), bool(kv_cache))


@functools.lru_cache(maxsize=64)
def _tokenize_1(name: str) -> int:
    m = meta_adapter(name)
    return count(m.tokenize, torch.zeros(1, 3, m.image_size, m.image_size, device=META))


@functools.lru_cache(maxsize=64)
def _decode_1(name: str) -> int:
    m = meta_adapter(name)
    toks, flat = _tokens(m, 1)
    if m.family == "llamagen":  # the adapter checks id ranges with .item(), which meta tensors cannot do
        g = m.transformer.grid
        return count(m.tokenizer.decode_code, flat, (1, m.tokenizer.codebook_embed_dim, g, g))
    return count(m.decode, toks)


@functools.lru_cache(maxsize=64)
def _teacher_forced_1(name: str) -> int:
    m = meta_adapter(name)
    toks, flat = _tokens(m, 1)
    labels = torch.zeros(1, dtype=torch.long, device=META)
    if m.family == "llamagen":
        return count(m.transformer, flat[:, :-1], labels)
    return count(m.teacher_forced_logits, toks, labels)


@functools.lru_cache(maxsize=64)
def _generate_1(name: str, prefix: int, cfg: float, kv_cache: bool) -> int:
    batch = 1
    m = meta_adapter(name)
    m.check_prefix(prefix)
    toks, flat = _tokens(m, batch)
    labels = torch.zeros(batch, dtype=torch.long, device=META)
    if m.family == "var":
        n_scales = 0 if prefix == 0 else [s.stop for s in m.scale_slices].index(prefix) + 1
        pre = toks[:n_scales] if n_scales else None
        return count(
            m.transformer.generate, m.tokenizer, labels, cfg=cfg, top_k=1, prefix_idx_Bl=pre, kv_cache=kv_cache
        )
    pre = flat[:, :prefix] if prefix else None
    if m.family == "rar":
        return count(m.transformer.generate, labels, guidance_scale=cfg, top_k=1, prefix_BP=pre, kv_cache=kv_cache)
    from iarmem_core.models import llamagen as gpt_lib

    return count(
        gpt_lib.generate, m.transformer, labels, prefix_BP=pre, cfg_scale=cfg, greedy=True, top_k=1, kv_cache=kv_cache
    )


@functools.lru_cache(maxsize=64)
def _generate_prefixes_1(name: str, prefixes: tuple[int, ...], cfg: float, kv_cache: bool) -> int:
    m = meta_adapter(name)
    nonzero = [p for p in prefixes if p]
    if m.family == "var" or not kv_cache or len(nonzero) < 2:  # one generation per prefix
        return sum(_generate_1(name, p, cfg, kv_cache) for p in prefixes)
    _, flat = _tokens(m, 1)
    labels = torch.zeros(1, dtype=torch.long, device=META)
    from iarmem_core.models import llamagen as gpt_lib

    def sweep():  # as RARAdapter / LlamaGenAdapter.generate_prefixes: one prefill, then each prefix from it
        tr = m.transformer
        if m.family == "rar":
            shared = tr.prefill(labels, flat[:, : max(nonzero)], cfg)
        else:
            shared = gpt_lib.prefill(tr, labels, flat[:, : max(nonzero)], cfg)
        for p in prefixes:
            pre = flat[:, :p] if p else None
            if m.family == "rar":
                cache = shared.truncated(tr.PREFIX + p - 1) if p else None
                tr.generate(labels, guidance_scale=cfg, top_k=1, prefix_BP=pre, cache=cache)
            else:
                cache = shared.truncated(tr.cls_token_num + p - 1) if p else None
                gpt_lib.generate(tr, labels, prefix_BP=pre, cfg_scale=cfg, greedy=True, top_k=1, cache=cache)

    return count(sweep)


def attack_flops(name: str, n_candidates: int, prefixes: list[int], cached_references: bool) -> dict:
    """FLOPs of attacking `n_candidates` at each prefix: generation and the generated images' decodes, plus
    (unless the references are cached) tokenizing and decoding the candidates. Similarity measures (SSIM,
    the small feature nets) are not counted."""
    out = {
        "generate": generate_prefixes_flops(name, n_candidates, prefixes),
        "decode_generated": len(prefixes) * decode_flops(name, n_candidates),
        "tokenize": 0 if cached_references else tokenize_flops(name, n_candidates),
        "decode_reference": 0 if cached_references else decode_flops(name, n_candidates),
    }
    out["total"] = sum(out.values())
    return out


def transformer_flops_estimate(adapter: IARAdapter, rows: int, keys: int | None = None, batch: int = 1) -> int:
    """2 x (weights of the transformer's Linear layers that run per row) x rows + 4 x rows x keys x width x
    blocks (QK^T and AV), per image, times `batch`: the textbook count for one forward of `rows` query rows
    over `keys` key rows (default rows). Per-sample layers (VAR's AdaLN, class embeddings) are left out."""
    keys = rows if keys is None else keys
    per_row = 0
    for name, mod in adapter.transformer.named_modules():
        if isinstance(mod, nn.Linear) and "ada_lin" not in name:  # VAR's AdaLN runs once per image
            per_row += mod.in_features * mod.out_features
    site = adapter.unit_sites()[0]
    mlp = adapter.transformer.get_submodule(site.module)
    width = next(mod.in_features for mod in mlp.modules() if isinstance(mod, nn.Linear))  # fc1 reads the width
    return batch * (2 * per_row * rows + 4 * rows * keys * width * adapter.n_blocks)


# ---------------------------------------------------------------------------------------------------
# metering a real run
_METERED = {  # adapter method -> part
    "tokenize": "tokenize",
    "decode": "decode",
    "decode_latent": "decode",
    "teacher_forced_logits": "teacher_forced",
    "generate": "generate",
    "generate_latent": "generate",
    "generate_prefixes": "generate",
}


class Meter:
    """Model FLOPs and seconds of every tokenize / decode / teacher-forced pass / generation that `adapter` runs
    inside the block (the calls of every job, the attack, quality samples, ...), by part.

    The instance's methods are wrapped for the duration (other instances and threads are unaffected); a call
    made inside another metered call (VAR's generate -> generate_latent) counts once. FLOPs per call come from
    the counts above, for the call's batch, prefix, CFG and KV-cache setting; CUDA work is synchronised before a
    call's time is taken.

        >>> with flops.Meter(adapter) as meter:
        ...     extraction.run_extraction(adapter, sel, cfg)
        >>> meter.flops["generate"], meter.seconds["decode"]
    """

    def __init__(self, adapter: IARAdapter, name: str | None = None):
        self.adapter, self.name = adapter, name or adapter.spec.name
        self.flops: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def _count(self, meth: str, args: tuple, kwargs: dict) -> int:
        ad = self.adapter
        if meth == "tokenize":
            return tokenize_flops(self.name, int(args[0].shape[0]))
        if meth in ("decode", "decode_latent"):
            x = args[0]
            b = int(x.shape[0]) if isinstance(x, torch.Tensor) else int(x[0].shape[0])
            return decode_flops(self.name, b)
        if meth == "teacher_forced_logits":
            return teacher_forced_flops(self.name, int(ad._labels(args[1]).numel()))
        if meth == "generate_prefixes":
            kw = {**dict(zip(("labels", "tokens", "prefixes", "seeds", "kv_cache"), args, strict=False)), **kwargs}
            b = int(torch.as_tensor(kw["labels"]).numel())
            return generate_prefixes_flops(
                self.name, b, kw["prefixes"], float(kw.get("cfg", 0.0)), bool(kw.get("kv_cache", True))
            )
        names = ("labels", "prefix", "n_prefix", "cfg", "top_k", "top_p", "temperature", "seed", "kv_cache")
        kw = {**dict(zip(names, args, strict=False)), **kwargs}
        b = int(torch.as_tensor(kw["labels"]).numel())
        return generate_flops(
            self.name, b, int(kw.get("n_prefix", 0)), float(kw.get("cfg", 0.0)), bool(kw.get("kv_cache", True))
        )

    def _wrap(self, meth: str, fn):
        part = _METERED[meth]

        def inner(*args, **kwargs):
            outer = self._depth == 0
            self._depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if outer:
                    if self.adapter.device.type == "cuda":
                        torch.cuda.synchronize()
                    self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - t
                    self.flops[part] = self.flops.get(part, 0) + self._count(meth, args, kwargs)
                    self.calls[part] = self.calls.get(part, 0) + 1

        return inner

    def __enter__(self) -> Meter:
        for meth in _METERED:
            setattr(self.adapter, meth, self._wrap(meth, getattr(self.adapter, meth)))
        return self

    def __exit__(self, *exc) -> None:
        for meth in _METERED:
            self.adapter.__dict__.pop(meth, None)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def report(self, wall_s: float, peak: dict) -> dict:
        """The metered FLOPs against the wall time and `peak`, with seconds and FLOP/s per part."""
        out = fraction(self.total_flops, wall_s, peak)
        out["parts"] = {
            k: {
                "flops": self.flops[k],
                "seconds": round(self.seconds[k], 3),
                "calls": self.calls[k],
                "flops_per_s": self.flops[k] / self.seconds[k] if self.seconds[k] > 0 else None,
                "fraction_of_peak": round(self.flops[k] / self.seconds[k] / peak["flops_per_s"], 4)
                if self.seconds[k] > 0
                else None,
            }
            for k in sorted(self.flops)
        }
        out["metered_s"] = round(sum(self.seconds.values()), 3)
        return out


# ---------------------------------------------------------------------------------------------------
# the machine's limit
def measure_peak(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None, seconds: float = 1.0
) -> dict:
    """FLOP/s of an n x n matmul (n: 2048 on CPU, 8192 on CUDA) in `dtype`, best of repeated runs of about
    `seconds` in total, on `device` with this process's threads. On CUDA, fp32 follows
    torch.backends.cuda.matmul.allow_tf32 (reported).

    CPU fp32 has two GEMMs (`iarmem_core.models.linear`): PyTorch's (MKL) and oneDNN's. Both are timed, half of
    `seconds` each; the peak is the faster, and ``by_gemm`` holds both (on AMD CPUs MKL's is about half)."""
    dev = resolve_device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if dev.type == "cpu" and dtype == torch.float32 and linear_mod._ONEDNN:
        b_t = b.t().contiguous()

        def onednn():
            with linear_mod.cpu_gemm("onednn"):
                return linear_mod.linear(a, b_t)

        kernels = {"mkl (torch.mm)": kernels["torch.mm"], "onednn": onednn}
    rates, reps = {}, {}
    with torch.no_grad():
        for name, fn in kernels.items():
            fn()  # warm-up (allocator, kernel choice)
            sync()
            best, spent, k = 0.0, 0.0, 0
            while spent < seconds / len(kernels) or k < 3:
                t = time.perf_counter()
                fn()
                sync()
                dt = time.perf_counter() - t
                spent += dt
                k += 1
                best = max(best, 2 * n**3 / dt)
            rates[name], reps[name] = best, k
    top = max(rates, key=rates.get)
    what = f"{n}x{n} {str(dtype).removeprefix('torch.')} matmuls on {dev}"
    out = {
        "flops_per_s": rates[top],
        "how": f"best of {reps[top]} {what}" + (f" ({top}, the faster GEMM)" if len(rates) > 1 else ""),
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
    }
    if len(rates) > 1:
        out["by_gemm"] = {k: round(v / 1e9, 1) for k, v in rates.items()}  # GFLOP/s
    if dev.type == "cuda":
        out["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def best_peak(*peaks: dict) -> dict:
    """The highest of several peak measurements (e.g. at the start and the end of a run on a shared machine,
    where one short window can fall on a busy moment), noting all of them."""
    best = dict(max(peaks, key=lambda p: p["flops_per_s"]))
    if len(peaks) > 1:
        seen = ", ".join(f"{p['flops_per_s'] / 1e9:.1f}" for p in peaks)
        best["how"] += f"; the best of {len(peaks)} measurements in this run ({seen} GFLOP/s)"
    return best


def fraction(model_flops: float, seconds: float, peak: dict) -> dict:
    """{model_flops, seconds, achieved_flops_per_s, peak_flops_per_s, fraction_of_peak, peak_how}."""
    achieved = model_flops / seconds if seconds > 0 else float("nan")
    return {
        "model_flops": float(model_flops),
        "seconds": round(float(seconds), 4),
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak["flops_per_s"],
        "fraction_of_peak": round(achieved / peak["flops_per_s"], 4),
        "peak_how": peak["how"],
    }


def fraction_parts(parts: dict[str, tuple[float, dict]], seconds: float) -> dict:
    """A workload of parts at different precisions: {part: (flops, peak)}. The limit is the time every part
    would take at its own peak; fraction_of_peak = that time / `seconds`."""
    total = sum(f for f, _ in parts.values())
    at_peak = sum(f / pk["flops_per_s"] for f, pk in parts.values())
    return {
        "model_flops": float(total),
        "seconds": round(float(seconds), 4),
        "achieved_flops_per_s": total / seconds if seconds > 0 else float("nan"),
        "seconds_at_peak": at_peak,
        "fraction_of_peak": round(at_peak / seconds, 4) if seconds > 0 else float("nan"),
        "peak_how": {k: pk["how"] for k, (_, pk) in parts.items()},
    }
