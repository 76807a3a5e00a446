"""Recompute the tensors of a VAR golden folder (layout of ../shared/golden/var) with our models.

Works for any tiny config in that layout: the models are built from ``config.json["config"]`` and each
listed tensor name is matched by pattern (``var_block{i}_ffn_fc1_out_BLH`` for any block i, per-scale
lists of any length). Downstream tensors are fed the golden upstream values (e.g. the teacher-forcing
logits use the golden ``var_x_BLCv_wo_first_l``) so a failure points at one stage. Names without a rule
are not returned, and the runner reports them as failures.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from iarmem_core.models import hook_points as hp
from iarmem_core.models.var import VAR
from iarmem_core.models.vqvae_ms import VQVAE

_BLOCK_RE = re.compile(r"^var_block(\d+)_(ffn_fc1_out_BLH|ffn_act_out_BLH|out_BLC)$")
_DDCONFIG_KEYS = ("in_channels", "num_res_blocks", "using_sa", "using_mid_sa")


def build_models(config: dict) -> tuple[VQVAE, VAR]:
    """Our VQVAE and VAR from a golden ``config.json["config"]`` (random weights until loaded)."""
    vae_kw = dict(config["vae"])
    if config.get("vae_ch_mult_override"):
        vae_kw["ch_mult"] = tuple(config["vae_ch_mult_override"])
    for k in _DDCONFIG_KEYS:
        if k in config.get("vae_ddconfig_fixed", {}):
            vae_kw[k] = config["vae_ddconfig_fixed"][k]
    vae = VQVAE(**vae_kw)
    var = VAR(vocab_size=vae.vocab_size, Cvae=vae.Cvae, **config["var"])
    return vae.eval(), var.eval()


def _load(module: torch.nn.Module, path: Path) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(sd, strict=True)


def _input_image(config: dict) -> torch.Tensor:
    """The input image from its recorded seed: (U - 0.5 + U(B,3,1,1) 1.2 - 0.6).clamp(-1, 1)."""
    B, size = int(config["batch"]), int(config["image_size"])
    g = torch.Generator().manual_seed(int(config["image_generator_seed"]))
    u = torch.rand(B, 3, size, size, generator=g)
    return (u - 0.5 + torch.rand(B, 3, 1, 1, generator=g) * 1.2 - 0.6).clamp(-1, 1)


def _ar_labels(args: dict, num_classes: int) -> torch.Tensor:
    B, lab = int(args["B"]), args["label_B"]
    if isinstance(lab, int):
        return torch.full((B,), num_classes if lab < 0 else lab, dtype=torch.long)
    return torch.as_tensor(lab, dtype=torch.long).reshape(B)


@torch.no_grad()
def compute(golden_dir: Path, config: dict, golden: dict) -> dict:
    """Every tensor of ``config["tensors"]`` that a rule below knows, recomputed with our models."""
    cfg = config["config"]
    names = list(config.get("tensors", {}))
    vae, var = build_models(cfg)
    _load(vae, Path(golden_dir) / "vae_state_dict.pt")
    _load(var, Path(golden_dir) / "var_state_dict.pt")
    var.init_non_persistent()
    out: dict = {}

    # inputs: recomputed from the config, then the golden values are fed downstream
    if {"image_generator_seed", "batch", "image_size"} <= set(cfg):
        out["input_img_B3HW"] = _input_image(cfg)
    if "labels" in cfg:
        out["label_B"] = torch.as_tensor(cfg["labels"], dtype=torch.long)
    ar_args = cfg.get("autoregressive_infer_cfg_args")
    if ar_args is not None:
        out["ar_label_B"] = _ar_labels(ar_args, var.num_classes)
    img = golden.get("input_img_B3HW", out.get("input_img_B3HW"))
    label_B = golden.get("label_B", out.get("label_B"))

    # VQVAE
    if img is not None:
        f = vae.img_to_f(img)
        out["vae_f_BChw"] = f
        idx_list = vae.quantize.f_to_idxBl_or_fhat(golden.get("vae_f_BChw", f), to_fhat=False)
        out["vae_idx_Bl_list"] = idx_list
        out["vae_gt_idx_BL"] = torch.cat(idx_list, dim=1)
        out["vae_fhat_per_scale_SBChw"] = torch.stack(
            vae.quantize.f_to_idxBl_or_fhat(golden.get("vae_f_BChw", f), to_fhat=True)
        )
    gt_idx = golden.get("vae_idx_Bl_list", out.get("vae_idx_Bl_list"))
    if gt_idx is not None:
        out["vae_recon_last_B3HW"] = vae.idxBl_to_img(gt_idx, same_shape=True, last_one=True)
        out["vae_recon_all_scales_SB3HW"] = torch.stack(vae.idxBl_to_img(gt_idx, same_shape=True, last_one=False))
        out["var_x_BLCv_wo_first_l"] = vae.quantize.idxBl_to_var_input(gt_idx)

    # VAR teacher forcing, with the unit hooks for fc1/act and a forward hook for the residual stream
    x_in = golden.get("var_x_BLCv_wo_first_l", out.get("var_x_BLCv_wo_first_l"))
    if x_in is not None and label_B is not None:
        acts: dict[str, torch.Tensor] = {}

        def keep(kind: str):
            def fn(block: int, a: torch.Tensor, info: hp.CallInfo | None) -> None:
                acts[f"var_block{block}_ffn_{kind}_out_BLH"] = a.clone()

            return fn

        handles = [
            b.register_forward_hook(lambda m, i, o, k=f"var_block{bi}_out_BLC": acts.__setitem__(k, o.clone()))
            for bi, b in enumerate(var.blocks)
        ]
        try:
            with (
                hp.observe(var, "blocks.*.mlp.hook_pre", keep("fc1")),
                hp.observe(var, "blocks.*.mlp.hook_post", keep("act")),
            ):
                out["var_logits_BLV"] = var(label_B, x_in)
        finally:
            for h in handles:
                h.remove()
        out.update(acts)

    # generation with the KV cache and the official CFG ramp
    if ar_args is not None and not ar_args.get("more_smooth", False):
        logits_list: list[torch.Tensor] = []
        seed = ar_args.get("g_seed")
        idx_list, f_hat = var.generate(
            vae,
            _ar_labels(ar_args, var.num_classes),
            cfg=float(ar_args.get("cfg", 1.5)),
            top_k=int(ar_args.get("top_k", 0)),
            top_p=float(ar_args.get("top_p", 0.0)),
            g_seed=None if seed is None else int(seed),
            on_logits=lambda si, lg: logits_list.append(lg.clone()),
        )
        out["ar_logits_cfg_list"] = logits_list
        out["ar_idx_Bl_list"] = idx_list
        out["ar_img_B3HW"] = vae.fhat_to_img(f_hat).add(1).mul(0.5)

    # keep only what the folder lists, and only block tensors of blocks that exist
    known = {n for n in names if n in out}
    for n in names:
        m = _BLOCK_RE.match(n)
        if m and int(m.group(1)) >= len(var.blocks):
            known.discard(n)
    return {n: out[n] for n in known}
