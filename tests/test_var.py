"""VAR conformance: official golden data, a golden-layout folder of another config, full-size keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from iarmem_core import conformance
from iarmem_core.adapters.var import VARAdapter
from iarmem_core.conformance import var as var_conf
from iarmem_core.registry import get_spec


# ---------------------------------------------------------------------------------------------------
# 1. The official golden folder
@pytest.mark.golden
def test_official_golden_all_tensors_match(golden_var):
    rep = conformance.run(golden_var)
    listed = json.loads((golden_var / "config.json").read_text())["tensors"]
    bad = {k: v for k, v in rep["tensors"].items() if not v["ok"]}
    assert not bad, bad
    assert rep["all_ok"] and rep["n_checked"] == rep["n_listed"] == len(listed) == 20
    # token ids are exact; the float tensors are far inside the 1e-4 tolerance
    for name in ("vae_idx_Bl_list", "vae_gt_idx_BL", "ar_idx_Bl_list", "label_B", "ar_label_B"):
        assert rep["tensors"][name]["exact"], name
    assert max(v.get("max_abs_err", 0.0) for v in rep["tensors"].values()) < 1e-5


@pytest.mark.golden
def test_cli_exit_code(golden_var, capsys):
    from iarmem_core.conformance.__main__ import main

    assert main([str(golden_var)]) == 0
    assert json.loads(capsys.readouterr().out)["all_ok"] is True


# ---------------------------------------------------------------------------------------------------
# 2. A second folder in the same layout, from another tiny config (3 blocks, shared AdaLN, 3 scales,
#    batch 2, 4 heads, V=64, Cvae=4, 2 Phi layers, CFG 2.0), written with our models by a path that does
#    not go through conformance/var.py (plain forward hooks, the adapter's decode).
ALT_CONFIG = {
    "seed": 0,
    "vae": {
        "vocab_size": 64,
        "z_channels": 4,
        "ch": 32,
        "dropout": 0.0,
        "beta": 0.25,
        "using_znorm": False,
        "quant_conv_ks": 3,
        "quant_resi": 0.5,
        "share_quant_resi": 2,
        "default_qresi_counts": 0,
        "v_patch_nums": [1, 2, 4],
        "test_mode": True,
    },
    "vae_ch_mult_override": [1, 2],
    "vae_ddconfig_fixed": {"in_channels": 3, "num_res_blocks": 2, "using_sa": True, "using_mid_sa": True},
    "var": {
        "num_classes": 5,
        "depth": 3,
        "embed_dim": 64,
        "num_heads": 4,
        "mlp_ratio": 2.0,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "norm_eps": 1e-6,
        "shared_aln": True,
        "cond_drop_rate": 0.1,
        "attn_l2_norm": True,
        "patch_nums": [1, 2, 4],
    },
    "image_size": 8,
    "batch": 2,
    "labels": [4, 1],
    "image_generator_seed": 77,
    "autoregressive_infer_cfg_args": {
        "B": 3,
        "label_B": [2, 0, 3],
        "g_seed": 5,
        "cfg": 2.0,
        "top_k": 1,
        "top_p": 0.0,
        "more_smooth": False,
    },
}


def _write_alt_folder(d):
    torch.manual_seed(123)
    vae, var = var_conf.build_models(ALT_CONFIG)
    VARAdapter.random_init(vae)
    VARAdapter.random_init(var)
    torch.save(vae.state_dict(), d / "vae_state_dict.pt")
    torch.save(var.state_dict(), d / "var_state_dict.pt")
    cfg = ALT_CONFIG
    g = torch.Generator().manual_seed(cfg["image_generator_seed"])
    B, H = cfg["batch"], cfg["image_size"]
    img = (torch.rand(B, 3, H, H, generator=g) - 0.5 + torch.rand(B, 3, 1, 1, generator=g) * 1.2 - 0.6).clamp(-1, 1)
    label_B = torch.tensor(cfg["labels"])
    t: dict = {"input_img_B3HW": img, "label_B": label_B}
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(img))
        idx = vae.img_to_idxBl(img)
        t.update(
            vae_f_BChw=f,
            vae_idx_Bl_list=idx,
            vae_gt_idx_BL=torch.cat(idx, 1),
            vae_fhat_per_scale_SBChw=torch.stack(vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)),
            vae_recon_last_B3HW=vae.idxBl_to_img(idx, same_shape=True, last_one=True),
            vae_recon_all_scales_SB3HW=torch.stack(vae.img_to_reconstructed_img(img)),
        )
        x = vae.quantize.idxBl_to_var_input(idx)
        t["var_x_BLCv_wo_first_l"] = x
        handles = []
        for i, b in enumerate(var.blocks):
            for mod, name in ((b.ffn.fc1, "ffn_fc1_out_BLH"), (b.ffn.act, "ffn_act_out_BLH"), (b, "out_BLC")):
                handles.append(
                    mod.register_forward_hook(lambda m, a, o, k=f"var_block{i}_{name}": t.__setitem__(k, o.clone()))
                )
        t["var_logits_BLV"] = var(label_B, x)
        for h in handles:
            h.remove()
        ar = cfg["autoregressive_infer_cfg_args"]
        logits = []
        toks, f_hat = var.generate(
            vae,
            torch.tensor(ar["label_B"]),
            cfg=ar["cfg"],
            top_k=ar["top_k"],
            g_seed=ar["g_seed"],
            on_logits=lambda si, lg: logits.append(lg.clone()),
        )
        t.update(
            ar_label_B=torch.tensor(ar["label_B"]),
            ar_logits_cfg_list=logits,
            ar_idx_Bl_list=toks,
            ar_img_B3HW=(vae.idxBl_to_img(toks, same_shape=True, last_one=True) + 1) * 0.5,
        )
    torch.save(t, d / "golden.pt")
    (d / "config.json").write_text(json.dumps({"family": "VAR", "config": cfg, "tensors": {k: {} for k in t}}))
    return t


@pytest.fixture(scope="module")
def alt_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden_alt_var")
    tensors = _write_alt_folder(d)
    return d, tensors


def _variant(alt_folder, tmp_path, edit_tensors):
    src, tensors = alt_folder
    d = tmp_path / "variant"
    shutil.copytree(src, d)
    t = dict(tensors)
    edit_tensors(t)
    torch.save(t, d / "golden.pt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["tensors"] = {k: {} for k in t}
    (d / "config.json").write_text(json.dumps(cfg))
    return conformance.run(d)


def test_runner_is_generic_over_configs(alt_folder):
    d, tensors = alt_folder
    rep = conformance.run(d)
    assert rep["all_ok"], {k: v for k, v in rep["tensors"].items() if not v["ok"]}
    assert rep["n_checked"] == rep["n_listed"] == len(tensors) == 10 + 3 * 3 + 4
    assert rep["tensors"]["var_block2_ffn_act_out_BLH"]["ok"]
    assert [x.shape[1] for x in tensors["ar_idx_Bl_list"]] == [1, 4, 16]
    # the chosen inputs are not degenerate: several distinct tokens at the last scale
    assert tensors["ar_idx_Bl_list"][-1].unique().numel() > 4 and tensors["vae_idx_Bl_list"][-1].unique().numel() > 4


def test_runner_fails_a_perturbed_float_tensor(alt_folder, tmp_path):
    def edit(t):
        t["var_block2_ffn_act_out_BLH"] = t["var_block2_ffn_act_out_BLH"] + 1e-3

    rep = _variant(alt_folder, tmp_path, edit)
    failed = [k for k, v in rep["tensors"].items() if not v["ok"]]
    assert not rep["all_ok"] and failed == ["var_block2_ffn_act_out_BLH"]
    assert rep["tensors"]["var_block2_ffn_act_out_BLH"]["max_abs_err"] == pytest.approx(1e-3, rel=1e-2)


def test_runner_fails_a_perturbed_token_id(alt_folder, tmp_path):
    def edit(t):
        lst = [x.clone() for x in t["ar_idx_Bl_list"]]
        lst[1][0, 2] = (lst[1][0, 2] + 1) % 64
        t["ar_idx_Bl_list"] = lst

    rep = _variant(alt_folder, tmp_path, edit)
    assert not rep["all_ok"] and [k for k, v in rep["tensors"].items() if not v["ok"]] == ["ar_idx_Bl_list"]


def test_runner_fails_unknown_names(alt_folder, tmp_path):
    def edit(t):
        t["var_block0_attn_out_BLC"] = torch.zeros(2, 21, 64)  # a name without a rule
        t["var_block3_out_BLC"] = torch.zeros(2, 21, 64)  # a block the config does not have

    rep = _variant(alt_folder, tmp_path, edit)
    failed = sorted(k for k, v in rep["tensors"].items() if not v["ok"])
    assert not rep["all_ok"] and failed == ["var_block0_attn_out_BLC", "var_block3_out_BLC"]
    assert "no rule" in rep["tensors"]["var_block3_out_BLC"]["error"]


# ---------------------------------------------------------------------------------------------------
# 3. Full-size structure: keys, shapes, dtypes, parameter/buffer kinds and counts (built on meta)
@pytest.fixture
def full_keys(golden_var):
    return json.loads((golden_var / "full_keys.json").read_text())


@pytest.mark.golden
@pytest.mark.parametrize("part", ["vae", "var_d16"])
def test_full_size_state_dict_matches_official(full_keys, part):
    ref = full_keys[part]
    spec = get_spec("var-d16")
    with torch.device("meta"):
        m = VARAdapter.build_tokenizer(spec) if part == "vae" else VARAdapter.build_transformer(spec)
    sd = m.state_dict()
    params = dict(m.named_parameters())
    ours = [
        (k, list(v.shape), str(v.dtype).removeprefix("torch."), "parameter" if k in params else "buffer")
        for k, v in sd.items()
    ]
    theirs = [(e["key"], e["shape"], e["dtype"], e["kind"]) for e in ref["state_dict"]]
    assert ours == theirs
    assert len(sd) == ref["num_state_dict_entries"]
    assert sum(p.numel() for p in m.parameters()) == ref["num_parameters"]


@pytest.mark.golden
@pytest.mark.parametrize("depth", [16, 20, 24, 30, 36])
def test_parameter_counts_of_released_sizes(full_keys, depth):
    ref = full_keys["param_counts_all_depths"][f"var_d{depth}"]
    spec = get_spec(f"var-d{depth}")
    with torch.device("meta"):
        m = VARAdapter.build_transformer(spec)
    assert sum(p.numel() for p in m.parameters()) == ref["num_parameters"] == spec.published["params"]
    assert sum(p.numel() for p in m.blocks.parameters()) == ref["num_parameters_blocks"]
    assert (m.L, m.shared_aln, m.C, m.blocks[0].ffn.fc1.out_features) == (
        ref["L"],
        ref["shared_aln"],
        ref["embed_dim"],
        ref["mlp_hidden"],
    )
