"""RAR + MaskGIT-VQGAN against the official golden data, a second golden folder and the released layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from iarmem_core import conformance
from iarmem_core.adapters.rar import RARAdapter
from iarmem_core.models.maskgit_vqgan import MaskGITVQGAN
from iarmem_core.models.rar import RAR
from iarmem_core.registry import get_spec

pytestmark = pytest.mark.golden


# ---- 1. the official golden folder ---------------------------------------------------------------
def test_conformance_official_golden(golden_rar: Path):
    report = conformance.run(golden_rar)
    bad = {k: v for k, v in report["tensors"].items() if not v["ok"]}
    assert report["all_ok"], bad
    assert report["n_checked"] == report["n_listed"] == 23
    assert report["tensors"]["gen_ids_BN"]["exact"] and report["tensors"]["tok_idx_BN"]["exact"]
    # stricter than the runner's 1e-4: the transformer matches to float rounding
    assert report["tensors"]["rar_logits_perm_BN1V"]["max_abs_err"] < 1e-5
    assert report["tensors"]["gen_step_logits_uncond_BNV"]["max_abs_err"] < 1e-5


def test_adapter_on_golden_weights(golden_rar: Path):
    """The adapter path (file loading, label offset, teacher forcing, greedy CFG generation) on golden."""
    g = torch.load(golden_rar / "golden.pt", weights_only=True)
    m = RARAdapter.load(
        get_spec("test-rar"),
        transformer_path=golden_rar / "rar_state_dict.pt",
        tokenizer_path=golden_rar / "tokenizer_state_dict.pt",
        device="cpu",
    )
    toks = m.tokenize(g["input_img_B3HW"])
    assert torch.equal(toks, g["tok_idx_BN"])
    torch.testing.assert_close(m.decode(toks), g["tok_decode_B3HW"], atol=1e-4, rtol=1e-4)
    logits = m.teacher_forced_logits(toks, g["label_B"])  # -1 = null class
    torch.testing.assert_close(logits, g["rar_logits_raster_BN1V"][:, :-1], atol=1e-4, rtol=1e-4)
    perm, targets = m.permuted_logits(toks, g["label_B"], g["rar_orders_perm_BN"])
    torch.testing.assert_close(perm, g["rar_logits_perm_BN1V"][:, :-1], atol=1e-4, rtol=1e-4)
    assert torch.equal(targets, g["rar_labels_perm_BN"])
    for kv in (True, False):
        ids = m.generate(g["gen_labels"], cfg=16.0, cfg_power=2.75, top_k=1, kv_cache=kv)
        assert torch.equal(ids, g["gen_ids_BN"])
    # greedy on the golden prefix continues with the golden tokens (the prefix only skips steps)
    ids = m.generate(g["gen_labels"], prefix=g["gen_ids_BN"], n_prefix=10, cfg=16.0, cfg_power=2.75, top_k=1)
    assert torch.equal(ids, g["gen_ids_BN"])


# ---- 2. a second golden folder, written by our implementation from another tiny config --------------
SECOND = {
    "seed": 5,
    "tokenizer_conf": {
        "channel_mult": [1, 2],
        "num_resolutions": 2,
        "dropout": 0.0,
        "hidden_channels": 32,
        "num_channels": 3,
        "num_res_blocks": 1,
        "resolution": 8,
        "z_channels": 8,
    },
    "tokenizer_quantizer": {"num_embeddings": 64, "embedding_dim": 8, "commitment_cost": 0.25},
    "rar_config": {
        "model": {
            "vq_model": {"codebook_size": 64, "token_size": 8, "num_latent_tokens": 16},
            "generator": {
                "hidden_size": 48,
                "num_hidden_layers": 3,
                "num_attention_heads": 3,
                "intermediate_size": 160,
                "dropout": 0.1,
                "attn_drop": 0.1,
                "class_label_dropout": 0.1,
                "image_seq_len": 16,
                "condition_num_classes": 5,
                "guidance_scale": 3.0,
                "use_checkpoint": False,
            },
        }
    },
    "image_size": 8,
    "batch": 4,
    "labels": [1, None, 4, 0],
    "image_generator_seed": 77,
    "generate_args": {
        "condition": [2, 3, 0],
        "guidance_scale": 3.0,
        "randomize_temperature": 1.0,
        "guidance_scale_pow": 1.5,
        "kv_cache": True,
    },
}


@torch.no_grad()
def _write_second_golden(folder: Path) -> None:
    """A golden folder in the official layout, computed through module forward hooks and the no-cache path."""
    cfg = SECOND
    torch.manual_seed(cfg["seed"])
    tok = MaskGITVQGAN(**cfg["tokenizer_conf"], **cfg["tokenizer_quantizer"]).eval()
    RARAdapter.random_init(tok)
    gen = RAR.from_official_config(cfg["rar_config"]).eval()
    gen.randomize_(torch.Generator().manual_seed(cfg["seed"] + 1))
    torch.save(tok.state_dict(), folder / "tokenizer_state_dict.pt")
    torch.save(gen.state_dict(), folder / "rar_state_dict.pt")

    gi = torch.Generator().manual_seed(cfg["image_generator_seed"])
    B, H = cfg["batch"], cfg["image_size"]
    pixels = torch.rand(B, 3, H, H, generator=gi)
    img = (pixels * 0.6 + torch.rand(B, 3, 1, 1, generator=gi) * 0.4).clamp(0, 1)
    h = tok.encoder(img)
    zq, idx = tok.quantize(h)
    V, n_cls = 64, 5
    labels = torch.tensor([-1 if c is None else c for c in cfg["labels"]])
    cond = torch.where(labels < 0, V + 1 + n_cls, labels + V + 1)
    t = {
        "input_img_B3HW": img,
        "tok_h_BChw": h,
        "tok_zq_BChw": zq,
        "tok_idx_BN": idx,
        "tok_decode_B3HW": tok.decode(idx),
        "label_B": labels,
        "rar_condition_B": cond,
    }

    seen: dict[str, torch.Tensor] = {}
    handles = []
    for i, blk in enumerate(gen.blocks):
        for name, mod in (
            (f"rar_block{i}_out_BTC", blk),
            (f"rar_block{i}_mlp_fc1_out_BTH", blk.mlp.fc1),
            (f"rar_block{i}_mlp_act_out_BTH", blk.mlp.act),
        ):
            hook = lambda _m, _i, o, n=name: seen.__setitem__(n, o.clone())  # noqa: E731
            handles.append(mod.register_forward_hook(hook))
    logits, lab = gen.forward_fn(idx, cond, return_labels=True)
    for hd in handles:
        hd.remove()
    t.update(seen)
    del t["rar_block0_mlp_act_out_BTH"], t["rar_block2_mlp_fc1_out_BTH"]  # any subset may be listed
    t.update(
        rar_logits_raster_BN1V=logits,
        rar_labels_raster_BN=lab,
        rar_ce_loss_raster=F.cross_entropy(logits[:, :-1].reshape(-1, V), lab.reshape(-1)),
    )
    g2 = torch.Generator().manual_seed(cfg["seed"] + 2)
    orders = torch.stack([torch.randperm(16, generator=g2) for _ in range(B)])
    lp, labp = gen.forward_fn(idx, cond, return_labels=True, orders_BN=orders)
    t.update(rar_orders_perm_BN=orders, rar_logits_perm_BN1V=lp, rar_labels_perm_BN=labp)

    ga = cfg["generate_args"]
    gl = torch.tensor(ga["condition"])
    ids, info = gen.generate(
        gl,
        ga["guidance_scale"],
        ga["guidance_scale_pow"],
        ga["randomize_temperature"],
        generator=torch.Generator().manual_seed(cfg["seed"]),
        kv_cache=False,
        return_logits=True,
    )
    g, pw = ga["guidance_scale"], ga["guidance_scale_pow"]
    sched = [(g - 1) * (1 - math.cos(((s / 16) ** pw) * math.pi)) / 2 + 1 for s in range(16)]
    t.update(
        gen_labels=gl,
        gen_ids_BN=ids,
        gen_step_logits_cond_BNV=info["cond"],
        gen_step_logits_uncond_BNV=info["uncond"],
        gen_cfg_scale_per_step_N=torch.tensor(sched),
        gen_decoded_B3HW=tok.decode(ids),
    )
    torch.save(t, folder / "golden.pt")
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in t.items()}
    config = {"family": "RAR", "config": cfg, "tensors": tensors}
    (folder / "config.json").write_text(json.dumps(config, indent=1))


@pytest.fixture(scope="module")
def second_golden(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("golden_rar_second")
    _write_second_golden(d)
    return d


def test_conformance_runner_is_generic(second_golden: Path):
    report = conformance.run(second_golden)
    assert report["all_ok"], {k: v for k, v in report["tensors"].items() if not v["ok"]}
    names = set(report["tensors"])
    assert {"rar_block2_out_BTC", "rar_block1_mlp_fc1_out_BTH", "rar_block2_mlp_act_out_BTH"} <= names
    assert report["n_checked"] == report["n_listed"] == len(names) == 26


def test_conformance_runner_fails_on_perturbed_and_unknown_tensors(second_golden: Path, tmp_path: Path):
    for f in second_golden.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    g = torch.load(tmp_path / "golden.pt", weights_only=True)
    g["rar_block1_mlp_fc1_out_BTH"][1, 5, 7] += 1e-3  # one element, above the 1e-4 tolerance
    g["gen_ids_BN"][0, -1] = (g["gen_ids_BN"][0, -1] + 1) % 64
    g["rar_block9_attn_out_BTC"] = torch.zeros(2)
    torch.save(g, tmp_path / "golden.pt")
    config = json.loads((tmp_path / "config.json").read_text())
    config["tensors"]["rar_block9_attn_out_BTC"] = {"shape": [2], "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = conformance.run(tmp_path)
    failed = {k for k, v in report["tensors"].items() if not v["ok"]}
    assert not report["all_ok"]
    assert failed == {"rar_block1_mlp_fc1_out_BTH", "gen_ids_BN", "rar_block9_attn_out_BTC"}
    assert 9e-4 < report["tensors"]["rar_block1_mlp_fc1_out_BTH"]["max_abs_err"] < 1.1e-3
    assert report["tensors"]["gen_ids_BN"]["mismatches"] == 1
    assert "no rule" in report["tensors"]["rar_block9_attn_out_BTC"]["error"]


# ---- 3. full-size layout -------------------------------------------------------------------------
def _layout(module: torch.nn.Module) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]


def test_full_size_state_dicts_match_release(golden_rar: Path):
    ref = json.loads((golden_rar / "full_keys.json").read_text())
    spec = get_spec("rar-b")
    with torch.device("meta"):
        tok = RARAdapter.build_tokenizer(spec)
        gen = RARAdapter.build_transformer(spec)
    for module, part in ((gen, "rar_b"), (tok, "tokenizer")):
        want = [(e["key"], e["shape"], e["dtype"]) for e in ref[part]["state_dict"]]
        assert _layout(module) == want  # same keys, order, shapes and dtypes
        assert sum(p.numel() for p in module.parameters()) == ref[part]["num_parameters"]
    assert len(ref["rar_b"]["state_dict"]) == 441 and len(ref["tokenizer"]["state_dict"]) == 168
    assert ref["tokenizer"]["num_parameters"] == 54_515_587


@pytest.mark.parametrize("size", ["b", "l", "xl", "xxl"])
def test_parameter_counts_of_released_sizes(golden_rar: Path, size: str):
    ref = json.loads((golden_rar / "full_keys.json").read_text())["param_counts"][f"rar_{size}"]
    spec = get_spec(f"rar-{size}")
    with torch.device("meta"):
        gen = RARAdapter.build_transformer(spec)
    assert sum(p.numel() for p in gen.parameters()) == ref["num_parameters"] == spec.published["params"]
    assert (len(gen.blocks), gen.hidden_size, gen.blocks[0].attn.head_dim) == (
        ref["num_hidden_layers"],
        ref["hidden_size"],
        ref["head_dim"],
    )
    assert gen.blocks[0].mlp.fc1.out_features == ref["intermediate_size"]
    assert (spec.sampling["temperature"], spec.sampling["cfg"], spec.sampling["cfg_power"]) == (
        ref["eval_sampling"]["randomize_temperature"],
        ref["eval_sampling"]["guidance_scale"],
        ref["eval_sampling"]["guidance_scale_pow"],
    )
