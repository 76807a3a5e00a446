"""Recompute a LlamaGen golden folder (layout of ../shared/golden/llamagen) with our VQModel and Transformer.

Works for any tiny c2i config in that layout: the models are built from ``config.json`` (``vq_model_args``,
``vq_encoder_decoder_ch_override``, ``vq_fixed``, ``gpt_model_args``), the state dicts load strictly, and
tensors are recognised by name, so other depths, widths, (kv) heads, vocabularies, grids, class counts,
seeds and CFG settings need no code change. The inputs of each stage are the golden inputs (the image,
``vq_idx_BN`` for teacher forcing), so one wrong stage does not hide behind another.

Names produced (any layer index i):
- ``input_img_B3HW`` (regenerated from ``image_generator_seed``), ``label_B``, ``gen_cond``
- ``vq_h_BChw``, ``vq_quant_BChw``, ``vq_idx_BN``, ``vq_decode_code_B3HW``
- ``gpt_freqs_cis``, ``gpt_input_idx``, ``gpt_logits_BNV``, ``gpt_ce_loss``
- ``gpt_layer{i}_out_BTC``, ``gpt_layer{i}_ffn_w1_out_BTH``, ``gpt_layer{i}_ffn_w3_out_BTH``,
  ``gpt_layer{i}_ffn_w2_in_BTH`` (w1 and w2-input come from our hook points, w3 from a forward hook)
- ``gen_seq_BN``, ``gen_logits_cfg_BNV``, ``gen_decoded_B3HW``
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from iarmem_core.models import hook_points as hp
from iarmem_core.models import llamagen as gpt_lib
from iarmem_core.models.llamagen import Transformer
from iarmem_core.models.vq import VQModel

_LAYER_OUT = re.compile(r"gpt_layer(\d+)_out_BTC")
_LAYER_FFN = re.compile(r"gpt_layer(\d+)_ffn_(w1_out|w3_out|w2_in)_BTH")


def _load(model: torch.nn.Module, path: Path) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)


def build_models(golden_dir: Path, cfg: dict) -> tuple[VQModel, Transformer]:
    """Our VQ and GPT from a golden config.json["config"], the folder's state dicts loaded strictly."""
    vq_kw = dict(cfg["vq_model_args"])
    if cfg.get("vq_encoder_decoder_ch_override") is not None:
        vq_kw["ch"] = int(cfg["vq_encoder_decoder_ch_override"])
    fixed = cfg.get("vq_fixed", {})
    if fixed.get("norm_type", "group") != "group" or not fixed.get("resamp_with_conv", True):
        raise ValueError(f"vq_fixed {fixed}: only GroupNorm and conv resampling (the released VQ) are implemented")
    for k in ("in_channels", "out_channels", "num_res_blocks"):
        if k in fixed:
            vq_kw[k] = int(fixed[k])
    vq = VQModel(**vq_kw)
    gpt = Transformer(**cfg["gpt_model_args"])
    _load(vq, golden_dir / "vq_state_dict.pt")
    _load(gpt, golden_dir / "gpt_state_dict.pt")
    return vq.eval(), gpt.eval()


def _input_image(cfg: dict, golden: dict) -> torch.Tensor | None:
    # the documented recipe: (U(B,3,H,W) - 0.5 + U(B,3,1,1)*1.2 - 0.6).clamp(-1, 1) from one seeded generator
    if "image_generator_seed" not in cfg:
        return None
    ref = golden.get("input_img_B3HW")
    B = int(cfg.get("batch", ref.shape[0] if ref is not None else 1))
    H = int(cfg["image_size"])
    gi = torch.Generator().manual_seed(int(cfg["image_generator_seed"]))
    u = torch.rand(B, 3, H, H, generator=gi)
    u_c = torch.rand(B, 3, 1, 1, generator=gi)
    return (u - 0.5 + u_c * 1.2 - 0.6).clamp(-1, 1)


@torch.no_grad()
def compute(golden_dir: Path, config: dict, golden: dict) -> dict:
    """Every tensor we can recompute for this folder, by golden name."""
    golden_dir = Path(golden_dir)
    cfg = config["config"]
    vq, gpt = build_models(golden_dir, cfg)
    listed = list(config.get("tensors", {}))
    out: dict = {}

    # 1. inputs
    img = _input_image(cfg, golden)
    if img is not None:
        out["input_img_B3HW"] = img
    if "labels" in cfg:
        out["label_B"] = torch.tensor(cfg["labels"], dtype=torch.long)
    gen_args = dict(cfg.get("generate_args", {}))
    if "cond" in gen_args:
        out["gen_cond"] = torch.tensor(gen_args["cond"], dtype=torch.long)

    # 2. tokenizer, on the golden image
    x = golden["input_img_B3HW"] if "input_img_B3HW" in golden else img
    if x is not None:
        h = vq.encode_latent(x)
        zq, idx = vq.quantize(h)
        out.update(
            vq_h_BChw=h,
            vq_quant_BChw=zq,
            vq_idx_BN=idx,
            gpt_input_idx=idx[:, :-1],
            vq_decode_code_B3HW=vq.decode_code(idx, (idx.shape[0], vq.codebook_embed_dim, *h.shape[2:])),
        )

    # 3. teacher forcing on the golden tokens, with every capture the names ask for
    out["gpt_freqs_cis"] = gpt.freqs_cis
    tokens = golden.get("vq_idx_BN", out.get("vq_idx_BN"))
    labels = golden.get("label_B", out.get("label_B"))
    if tokens is not None and labels is not None:
        caps: dict[str, torch.Tensor] = {}
        handles = []
        for i, layer in enumerate(gpt.layers):
            handles.append(
                layer.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__(f"gpt_layer{i}_out_BTC", o))
            )
            handles.append(
                layer.feed_forward.w3.register_forward_hook(
                    lambda m, a, o, i=i: caps.__setitem__(f"gpt_layer{i}_ffn_w3_out_BTH", o)
                )
            )

        def put(name: str):
            return lambda b, acts, info: caps.__setitem__(f"gpt_layer{b}_ffn_{name}_BTH", acts.clone())

        try:
            with (
                hp.observe(gpt, "blocks.*.mlp.hook_pre", put("w1_out")),
                hp.observe(gpt, "blocks.*.mlp.hook_post", put("w2_in")),
            ):
                logits, loss = gpt(tokens[:, :-1], labels, targets=tokens)
        finally:
            for hd in handles:
                hd.remove()
        out.update(gpt_logits_BNV=logits, gpt_ce_loss=loss)
        for name in listed:
            if (_LAYER_OUT.fullmatch(name) or _LAYER_FFN.fullmatch(name)) and name in caps:
                out[name] = caps[name]

    # 4. generation with the official sampler settings
    if "cond" in gen_args:
        cond = out["gen_cond"]
        sample = bool(gen_args.get("sample_logits", True))
        if sample:  # a multinomial draw: the official stream is the global RNG seeded with config seed
            torch.manual_seed(int(cfg.get("seed", 0)))
        ids, step_logits = gpt_lib.generate(
            gpt,
            cond,
            cfg_scale=float(gen_args.get("cfg_scale", 1.0)),
            cfg_interval=float(gen_args.get("cfg_interval", -1)),
            temperature=float(gen_args.get("temperature", 1.0)),
            top_k=int(gen_args.get("top_k", 0) or 0),
            top_p=float(gen_args.get("top_p", 1.0)),
            greedy=not sample,
            max_new_tokens=int(gen_args.get("max_new_tokens", gpt.block_size)),
            return_logits=True,
        )
        out.update(gen_seq_BN=ids, gen_logits_cfg_BNV=step_logits)
        if ids.shape[1] == gpt.block_size:
            out["gen_decoded_B3HW"] = vq.decode_code(ids, (ids.shape[0], vq.codebook_embed_dim, gpt.grid, gpt.grid))
    return out
