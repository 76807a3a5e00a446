"""Recompute the tensors of a RAR golden folder (layout of ../shared/golden/rar) with our models.

Works for any tiny RAR + MaskGIT-VQGAN config in that layout: the models are built from config.json,
the state dicts load strictly, and each tensor listed in ``config.json["tensors"]`` is recomputed by the
rule its name matches (block indices are read from the names, so any depth works). Inputs are
re-derived from their recipes (image seed, label list, permutation seed), never copied from golden.pt,
except the permutation the permuted-order logits are computed for.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from iarmem_core.models import hook_points as hp
from iarmem_core.models.maskgit_vqgan import MaskGITVQGAN
from iarmem_core.models.rar import RAR, guidance_schedule

_BLOCK_OUT = re.compile(r"rar_block(\d+)_out_BTC")
_BLOCK_MLP = re.compile(r"rar_block(\d+)_mlp_(fc1|act)_out_BTH")


def build_models(golden_dir: Path, config: dict) -> tuple[MaskGITVQGAN, RAR]:
    """Our tokenizer and generator from config.json, with the folder's state dicts (strict), eval mode."""
    cfg = config["config"]
    tok = MaskGITVQGAN(**cfg["tokenizer_conf"], **cfg["tokenizer_quantizer"])
    gen = RAR.from_official_config(cfg["rar_config"])
    for module, fname in ((tok, "tokenizer_state_dict.pt"), (gen, "rar_state_dict.pt")):
        sd = torch.load(Path(golden_dir) / fname, map_location="cpu", weights_only=True)
        module.load_state_dict(sd, strict=True)
        module.eval().requires_grad_(False)
    gen.init_non_persistent()
    return tok, gen


def input_images(cfg: dict) -> torch.Tensor:
    """The golden input images: (U(B,3,H,W) * 0.6 + U(B,3,1,1) * 0.4).clamp(0, 1) from the image seed."""
    gi = torch.Generator().manual_seed(int(cfg["image_generator_seed"]))
    B, H = int(cfg["batch"]), int(cfg["image_size"])
    pixels = torch.rand(B, 3, H, H, generator=gi)
    return (pixels * 0.6 + torch.rand(B, 3, 1, 1, generator=gi) * 0.4).clamp(0, 1)


def permutation(cfg: dict, batch: int, n: int) -> torch.Tensor:
    """Orders [B, N]: B successive randperm(N) draws of one Generator seeded seed + 2."""
    g = torch.Generator().manual_seed(int(cfg["seed"]) + 2)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])


@torch.no_grad()
def compute(golden_dir: Path, config: dict, golden: dict) -> dict:
    """name -> our tensor for every name in config["tensors"] that a rule covers."""
    cfg = config["config"]
    names = list(config.get("tensors", {}))
    tok, gen = build_models(golden_dir, config)
    out: dict = {}

    # 1. tokenizer
    img = input_images(cfg)
    out["input_img_B3HW"] = img
    h = tok.encoder(img)
    zq, idx_BN = tok.quantize(h)
    out.update(tok_h_BChw=h, tok_zq_BChw=zq, tok_idx_BN=tok.encode(img), tok_decode_B3HW=tok.decode(idx_BN))

    # 2. teacher forcing in raster order, capturing block outputs and MLP activations
    labels_B = torch.tensor([-1 if c is None else int(c) for c in cfg["labels"]], dtype=torch.long)
    cond_B = gen.preprocess_condition(labels_B)
    out.update(label_B=labels_B, rar_condition_B=cond_B)
    block_out: dict[int, torch.Tensor] = {}
    mlp: dict[tuple[int, str], torch.Tensor] = {}
    handles = [
        blk.register_forward_hook(lambda _m, _i, o, i=i: block_out.__setitem__(i, o.clone()))
        for i, blk in enumerate(gen.blocks)
    ]
    try:
        with (
            hp.observe(gen, "blocks.*.mlp.hook_pre", lambda b, a, _info: mlp.__setitem__((b, "fc1"), a.clone())),
            hp.observe(gen, "blocks.*.mlp.hook_post", lambda b, a, _info: mlp.__setitem__((b, "act"), a.clone())),
        ):
            logits, labels = gen.forward_fn(idx_BN, cond_B, return_labels=True)
    finally:
        for hd in handles:
            hd.remove()
    out.update(rar_logits_raster_BN1V=logits, rar_labels_raster_BN=labels)
    out["rar_ce_loss_raster"] = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())
    for name in names:
        if m := _BLOCK_OUT.fullmatch(name):
            if int(m.group(1)) in block_out:
                out[name] = block_out[int(m.group(1))]
        elif m := _BLOCK_MLP.fullmatch(name):
            key = (int(m.group(1)), m.group(2))
            if key in mlp:
                out[name] = mlp[key]

    # 3. teacher forcing in the golden permuted order
    B, N = idx_BN.shape
    out["rar_orders_perm_BN"] = permutation(cfg, B, N)
    orders = golden.get("rar_orders_perm_BN", out["rar_orders_perm_BN"])
    logits_p, labels_p = gen.forward_fn(idx_BN, cond_B, return_labels=True, orders_BN=orders)
    out.update(rar_logits_perm_BN1V=logits_p, rar_labels_perm_BN=labels_p)

    # 4. generation with the official arguments; the draw uses a Generator seeded like torch.manual_seed(seed)
    ga = cfg["generate_args"]
    gen_labels = torch.tensor([-1 if c is None else int(c) for c in ga["condition"]], dtype=torch.long)
    out["gen_labels"] = gen_labels
    ids, info = gen.generate(
        gen_labels,
        guidance_scale=float(ga["guidance_scale"]),
        guidance_scale_pow=float(ga.get("guidance_scale_pow", 0.0)),
        temperature=float(ga.get("randomize_temperature", 1.0)),
        generator=torch.Generator().manual_seed(int(cfg["seed"])),
        kv_cache=bool(ga.get("kv_cache", True)),
        return_logits=True,
    )
    out["gen_ids_BN"] = ids
    out["gen_step_logits_cond_BNV"] = info["cond"]
    if info["uncond"] is not None:
        out["gen_step_logits_uncond_BNV"] = info["uncond"]
    g, pw, n_gen = float(ga["guidance_scale"]), float(ga.get("guidance_scale_pow", 0.0)), ids.shape[1]
    out["gen_cfg_scale_per_step_N"] = torch.tensor(
        [guidance_schedule(s, n_gen, g, pw) for s in range(n_gen)], dtype=torch.float32
    )
    out["gen_decoded_B3HW"] = tok.decode(ids)
    return out
