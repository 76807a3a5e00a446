"""LlamaGen: golden conformance, a generic runner, full-size layout, KV-cache generation, hooks and edits."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from iarmem_core import hooks
from iarmem_core.adapters import load_adapter
from iarmem_core.adapters.llamagen import LlamaGenAdapter
from iarmem_core.conformance import run
from iarmem_core.models import hook_points
from iarmem_core.models import llamagen as gpt_lib
from iarmem_core.models.llamagen import Transformer, precompute_freqs_cis_2d, top_k_top_p_filter
from iarmem_core.models.vq import VQModel
from iarmem_core.registry import get_spec, list_models

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Golden-style random weights (no vanishing path): N(0, 1/fan_in) matrices, 1+0.1N norms, 0.1N biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if "embedding" in name:  # class and token tables, the VQ codebook: N(0, 1)
                p.copy_(n)
            elif p.ndim >= 2:
                p.copy_(n / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.1 * n)
            else:
                p.copy_(1 + 0.1 * n)
    return model


def tiny_gpt(seed: int = 0, **kw) -> Transformer:
    args = dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=64, num_classes=5, block_size=16)
    args.update(kw)
    return randomize_(Transformer(**args), seed).eval()


# ---------------------------------------------------------------------------------------------------
# 1. conformance with the official golden data
@pytest.mark.golden
def test_conformance_official_golden(golden_llamagen):
    report = run(golden_llamagen)
    bad = {k: v for k, v in report["tensors"].items() if not v["ok"]}
    assert report["all_ok"], bad
    assert (
        report["n_checked"]
        == report["n_listed"]
        == len(json.loads((golden_llamagen / "config.json").read_text())["tensors"])
    )
    t = report["tensors"]
    assert t["gen_seq_BN"]["exact"] and t["vq_idx_BN"]["exact"]
    # teacher forcing reproduces the official float32 numbers essentially bit for bit
    assert t["gpt_logits_BNV"]["max_abs_err"] < 1e-5 and t["gen_logits_cfg_BNV"]["max_abs_err"] < 1e-4


# ---------------------------------------------------------------------------------------------------
# 2. the runner is generic: a golden-layout folder from another tiny config, produced without the runner
_ALT_CFG = {
    "seed": 5,
    "vq_model_args": {
        "codebook_size": 64,
        "codebook_embed_dim": 4,
        "codebook_l2_norm": True,
        "codebook_show_usage": True,
        "commit_loss_beta": 0.25,
        "entropy_loss_ratio": 0.0,
        "encoder_ch_mult": [1, 2, 2],
        "decoder_ch_mult": [1, 2, 2],
        "z_channels": 16,
        "dropout_p": 0.0,
    },
    "vq_encoder_decoder_ch_override": 32,
    "vq_fixed": {
        "in_channels": 3,
        "out_channels": 3,
        "num_res_blocks": 2,
        "norm_type": "group",
        "resamp_with_conv": True,
    },
    "gpt_model_args": {
        "dim": 96,
        "n_layer": 3,
        "n_head": 6,
        "n_kv_head": 2,
        "multiple_of": 64,
        "ffn_dim_multiplier": 1.3,
        "rope_base": 100,
        "norm_eps": 1e-5,
        "num_classes": 6,
        "class_dropout_prob": 0.1,
        "model_type": "c2i",
        "vocab_size": 64,
        "cls_token_num": 1,
        "block_size": 16,
        "caption_dim": 2048,
        "max_batch_size": 32,
        "max_seq_len": 2048,
    },
    "image_size": 16,
    "batch": 2,
    "labels": [1, 6],
    "image_generator_seed": 77,
    "generate_args": {
        "cond": [4, 0, 2],
        "max_new_tokens": 16,
        "cfg_scale": 2.5,
        "cfg_interval": 6,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "sample_logits": False,
    },
}


@torch.no_grad()
def write_golden_folder(folder: Path, cfg: dict) -> None:
    """Golden files for `cfg` from our models, through code paths other than the runner's.

    Forward hooks on w1/w3/w2 (not our HookPoints) and generation without the KV cache (the runner uses it).
    """
    folder.mkdir(parents=True)
    vq = randomize_(VQModel(**cfg["vq_model_args"], ch=cfg["vq_encoder_decoder_ch_override"]), cfg["seed"]).eval()
    gpt = randomize_(Transformer(**cfg["gpt_model_args"]), cfg["seed"] + 1).eval()
    torch.save(vq.state_dict(), folder / "vq_state_dict.pt")
    torch.save(gpt.state_dict(), folder / "gpt_state_dict.pt")
    B, H = cfg["batch"], cfg["image_size"]
    gi = torch.Generator().manual_seed(cfg["image_generator_seed"])
    u = torch.rand(B, 3, H, H, generator=gi)
    img = (u - 0.5 + torch.rand(B, 3, 1, 1, generator=gi) * 1.2 - 0.6).clamp(-1, 1)
    g: dict = {"input_img_B3HW": img, "label_B": torch.tensor(cfg["labels"])}
    h = vq.quant_conv(vq.encoder(img))
    zq, idx = vq.quantize(h)
    g.update(
        vq_h_BChw=h,
        vq_quant_BChw=zq,
        vq_idx_BN=idx,
        gpt_input_idx=idx[:, :-1],
        vq_decode_code_B3HW=vq.decode(zq),
        gpt_freqs_cis=gpt.freqs_cis,
    )
    handles = []
    for i, layer in enumerate(gpt.layers):
        ff = layer.feed_forward
        handles += [
            layer.register_forward_hook(lambda m, a, o, i=i: g.__setitem__(f"gpt_layer{i}_out_BTC", o)),
            ff.w1.register_forward_hook(lambda m, a, o, i=i: g.__setitem__(f"gpt_layer{i}_ffn_w1_out_BTH", o)),
            ff.w3.register_forward_hook(lambda m, a, o, i=i: g.__setitem__(f"gpt_layer{i}_ffn_w3_out_BTH", o)),
            ff.w2.register_forward_pre_hook(lambda m, a, i=i: g.__setitem__(f"gpt_layer{i}_ffn_w2_in_BTH", a[0])),
        ]
    logits, _ = gpt(idx[:, :-1], g["label_B"])
    for hd in handles:
        hd.remove()
    g["gpt_logits_BNV"] = logits
    g["gpt_ce_loss"] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    ga = cfg["generate_args"]
    g["gen_cond"] = torch.tensor(ga["cond"])
    ids, step_logits = gpt_lib.generate(
        gpt,
        g["gen_cond"],
        cfg_scale=ga["cfg_scale"],
        cfg_interval=ga["cfg_interval"],
        greedy=True,
        kv_cache=False,
        return_logits=True,
    )
    g.update(gen_seq_BN=ids, gen_logits_cfg_BNV=step_logits)
    g["gen_decoded_B3HW"] = vq.decode(vq.quantize.lookup(ids))
    torch.save(g, folder / "golden.pt")
    config = {
        "family": "LlamaGen",
        "config": cfg,
        "tensors": {k: {"shape": list(v.shape)} for k, v in g.items()},
    }
    (folder / "config.json").write_text(json.dumps(config))


def _edit_folder(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    golden = torch.load(dst / "golden.pt", weights_only=True)
    fn(config, golden)
    torch.save(golden, dst / "golden.pt")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_conformance_runner_is_generic_and_fails_on_bad_data(tmp_path):
    good = tmp_path / "alt"
    write_golden_folder(good, _ALT_CFG)
    report = run(good)
    assert report["all_ok"], {k: v for k, v in report["tensors"].items() if not v["ok"]}
    assert report["n_checked"] == report["n_listed"] == 26  # 3 layers x 4 captures + 14 others
    assert {f"gpt_layer2_ffn_{s}_BTH" for s in ("w1_out", "w3_out", "w2_in")} <= set(report["tensors"])

    def perturb(config, golden):
        golden["gpt_logits_BNV"][0, 3, 5] += 1e-2
        golden["gen_seq_BN"][1, 7] = (golden["gen_seq_BN"][1, 7] + 1) % 64

    bad = run(_edit_folder(good, tmp_path / "perturbed", perturb))
    assert not bad["all_ok"]
    assert {k for k, v in bad["tensors"].items() if not v["ok"]} == {"gpt_logits_BNV", "gen_seq_BN"}
    assert bad["tensors"]["gen_seq_BN"]["mismatches"] == 1

    def unknown(config, golden):
        for name in ("gpt_layer0_attn_out_BTC", "gpt_layer3_out_BTC"):  # no rule; a layer the model lacks
            golden[name] = torch.zeros(2, 16, 96)
            config["tensors"][name] = {"shape": [2, 16, 96]}

    rep = run(_edit_folder(good, tmp_path / "unknown", unknown))
    assert not rep["all_ok"]
    assert {k for k, v in rep["tensors"].items() if not v["ok"]} == {
        "gpt_layer0_attn_out_BTC",
        "gpt_layer3_out_BTC",
    }
    assert "no rule" in rep["tensors"]["gpt_layer0_attn_out_BTC"]["error"]


# ---------------------------------------------------------------------------------------------------
# 3. full-size layout and parameter counts
def _layout(model: torch.nn.Module) -> list:
    params = {k for k, _ in model.named_parameters()}
    return [
        (k, list(v.shape), str(v.dtype).removeprefix("torch."), "parameter" if k in params else "buffer")
        for k, v in model.state_dict().items()
    ]


@pytest.mark.golden
def test_full_size_gpt_b_and_vq16_match_official_keys(golden_llamagen):
    ref = json.loads((golden_llamagen / "full_keys.json").read_text())
    spec = get_spec("llamagen-b-256")
    with torch.device("meta"):
        gpt = LlamaGenAdapter.build_transformer(spec)
        vq = LlamaGenAdapter.build_tokenizer(spec)
    for model, key in ((gpt, "gpt_b"), (vq, "vq_16")):
        want = [(e["key"], e["shape"], e["dtype"], e["kind"]) for e in ref[key]["state_dict"]]
        assert _layout(model) == want  # same keys, shapes, dtypes, kinds, and order
        assert sum(p.numel() for p in model.parameters()) == ref[key]["num_parameters"]
    assert len(hook_points.hook_points(gpt)) == 24


_OFFICIAL_SIZES = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-3B": (24, 32, 3200),
}


@pytest.mark.golden
def test_parameter_counts_of_all_released_sizes(golden_llamagen):
    counts = json.loads((golden_llamagen / "full_keys.json").read_text())["param_counts"]
    with torch.device("meta"):
        for name, (n_layer, n_head, dim) in _OFFICIAL_SIZES.items():
            m = Transformer(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=16384, num_classes=1000)
            assert sum(p.numel() for p in m.parameters()) == counts[f"{name}:c2i"]["num_parameters"], name
            assert m.ffn_hidden == counts[f"{name}:c2i"]["ffn_hidden"]
        for name, mult in (("VQ-16", (1, 1, 2, 2, 4)), ("VQ-8", (1, 2, 2, 4))):
            vq = VQModel(encoder_ch_mult=mult, decoder_ch_mult=mult)
            assert sum(p.numel() for p in vq.parameters()) == counts[name]["num_parameters"], name
        for name in list_models(family="llamagen", kind="released"):
            spec = get_spec(name)
            m = LlamaGenAdapter.build_transformer(spec)
            assert sum(p.numel() for p in m.parameters()) == spec.published["params"], name
            assert m.grid * 16 == spec.image_size


def test_rope_table_known_values():
    f = precompute_freqs_cis_2d(grid_size=3, head_dim=8, base=100, cls_token_num=1)  # [1+9, 4, 2]
    assert f.shape == (10, 4, 2) and f[0].abs().max() == 0  # the class row is zeros, not identity
    # token 5 is (row 1, col 2); pairs 0-1 turn with the row, 2-3 with the column; frequencies 100^(-k/2)
    angles = torch.tensor([1 * 1.0, 1 * 0.1, 2 * 1.0, 2 * 0.1])
    torch.testing.assert_close(f[1 + 5], torch.stack([angles.cos(), angles.sin()], -1))


# ---------------------------------------------------------------------------------------------------
# 4. generation: KV cache == teacher forcing, no-cache == cache, sampling filters
def _mixed_teacher_logits(gpt, ids, cond, cfg, interval):
    cond_l = gpt(ids[:, :-1], cond)[0]
    if cfg <= 1:
        return cond_l
    unc_l = gpt(ids[:, :-1], torch.full_like(cond, gpt.num_classes))[0]
    k = torch.arange(ids.shape[1])
    on = ((k - 1 <= interval) | (interval <= -1))[None, :, None]
    return torch.where(on, unc_l + (cond_l - unc_l) * cfg, cond_l)


@pytest.mark.parametrize("n_prefix,cfg,interval", [(0, 0.0, -1), (0, 3.0, -1), (5, 3.0, -1), (3, 2.0, 6)])
@torch.no_grad()
def test_kv_generation_equals_teacher_forcing(n_prefix, cfg, interval):
    gpt = tiny_gpt()  # grouped-query attention: 4 heads, 2 kv heads
    cond = torch.tensor([0, 3, 4])
    prefix = torch.randint(64, (3, n_prefix), generator=torch.Generator().manual_seed(1))
    ids, step = gpt_lib.generate(
        gpt, cond, prefix_BP=prefix, cfg_scale=cfg, cfg_interval=interval, greedy=True, return_logits=True
    )
    assert ids.shape == (3, 16) and ids.dtype == torch.long and torch.equal(ids[:, :n_prefix], prefix)
    ref = _mixed_teacher_logits(gpt, ids, cond, cfg, interval)[:, n_prefix:]
    torch.testing.assert_close(step, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ids[:, n_prefix:], ref.argmax(-1))
    if interval > -1:  # guidance really switches off after the interval
        assert not torch.allclose(step[:, 4 - n_prefix], gpt(ids[:, :-1], cond)[0][:, 4], atol=1e-3)
        torch.testing.assert_close(step[:, -1], gpt(ids[:, :-1], cond)[0][:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.golden
@torch.no_grad()
def test_golden_model_kv_generation_equals_teacher_forcing_with_prefix(golden_llamagen):
    m = load_adapter(
        "test-llamagen",
        checkpoint=golden_llamagen / "gpt_state_dict.pt",
        tokenizer_checkpoint=golden_llamagen / "vq_state_dict.pt",
        device="cpu",
    )
    g = torch.load(golden_llamagen / "golden.pt", weights_only=True)
    cond = g["label_B"][:2]
    ids, step = gpt_lib.generate(
        m.transformer, cond, prefix_BP=g["vq_idx_BN"][:2, :10], cfg_scale=4.0, greedy=True, return_logits=True
    )
    ref = _mixed_teacher_logits(m.transformer, ids, cond, 4.0, -1)[:, 10:]
    torch.testing.assert_close(step, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ids, m.generate(cond, prefix=g["vq_idx_BN"][:2], n_prefix=10, cfg=4.0, top_k=1))


@torch.no_grad()
def test_no_cache_gives_identical_ids():
    gpt = tiny_gpt(seed=3)
    cond = torch.tensor([1, 2])
    for kw in (
        dict(greedy=True, cfg_scale=2.0),
        dict(top_k=10, temperature=2.0),
        dict(top_p=0.9, cfg_scale=1.5),
    ):
        a = gpt_lib.generate(gpt, cond, generator=torch.Generator().manual_seed(4), **kw)
        b = gpt_lib.generate(gpt, cond, generator=torch.Generator().manual_seed(4), kv_cache=False, **kw)
        assert torch.equal(a, b), kw


def test_top_k_top_p_filter_known_answers():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(top_k_top_p_filter(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.45) == [True, False, False, False]  # the most likely token always stays
    assert kept(top_p=0.7) == [True, True, False, False]  # the first token crossing the threshold stays
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_k=1, top_p=0.99) == [True, False, False, False]
    assert torch.isfinite(logits).all()  # the input is not modified


def test_adapter_greedy_is_argmax_and_llamagen_options():
    m = load_adapter("test-llamagen", device="cpu", seed=1)
    greedy = m.generate([1, 2], top_k=1, temperature=3.0, seed=7)
    assert torch.equal(greedy, m.teacher_forced_logits(greedy, torch.tensor([1, 2])).argmax(-1))
    # cfg <= 1 means no guidance in the official sampler; cfg = 0 as well
    assert torch.equal(m.generate([1, 2], cfg=1.0), m.generate([1, 2], cfg=0.0))
    with pytest.raises(TypeError, match="cfg_interval"):
        m.generate([1, 2], cfg_power=2.0)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\]"):
        m.generate([11])


def test_label_dropout_and_train_mode():
    gpt = tiny_gpt(seed=2)
    idx, cond = torch.randint(64, (2, 15)), torch.tensor([1, 2])
    ref = gpt(idx, cond)[0]
    null = gpt(idx, torch.full_like(cond, 5))[0]
    torch.testing.assert_close(gpt(idx, cond, force_drop_ids=torch.tensor([0, 1]))[0][1], null[1])
    gpt.cls_embedding.dropout_prob = 1.0  # every label dropped, but only when training asks for it
    torch.testing.assert_close(gpt(idx, cond, drop_labels=True)[0], null)
    torch.testing.assert_close(gpt(idx, cond)[0], ref)
    gpt.train()  # all dropout probabilities at 0: training mode computes the same logits
    for mod in gpt.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    torch.testing.assert_close(gpt(idx, cond)[0], ref)


# ---------------------------------------------------------------------------------------------------
# 5. hooks and edits through the adapter
def test_hooks_fire_during_generation_with_targets_and_cfg_batch():
    m = load_adapter("test-llamagen", device="cpu")
    calls = []

    def rec(block, acts, info):
        if block == 1:
            calls.append((tuple(acts.shape), info.target_index.tolist(), info.cfg_doubled, info.mode))

    prefix = torch.randint(128, (2, 36))
    with hooks.capture(m.transformer, rec):
        m.generate([3, 4], prefix=prefix, n_prefix=4, cfg=2.0)
    assert calls[0] == ((4, 5, 256), [0, 1, 2, 3, 4], True, "generate")  # prefill: class + 4 prefix tokens
    assert calls[1:] == [((4, 1, 256), [k], True, "generate") for k in range(5, 36)]
    calls.clear()
    with hooks.capture(m.transformer, rec):
        m.generate([3, 4], cfg=0.0)
    assert [c[1] for c in calls] == [[k] for k in range(36)] and {c[0][0] for c in calls} == {2}
    assert not any(c[2] for c in calls)
    calls.clear()
    with hooks.capture(m.transformer, rec):
        m.teacher_forced_logits(prefix, torch.tensor([3, 4]))
    assert calls == [((2, 36, 256), list(range(36)), False, "teacher")]
    assert [s.hook for s in m.unit_sites()] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert m.unit_sites()[1].module == "layers.1.feed_forward" and m.n_units == 256


# ---------------------------------------------------------------------------------------------------
# 6. adapter round trip and the full-size random model
@pytest.mark.golden
def test_adapter_tokenize_decode_teacher_forcing_match_golden(golden_llamagen):
    m = load_adapter(
        "test-llamagen",
        checkpoint=golden_llamagen / "gpt_state_dict.pt",
        tokenizer_checkpoint=golden_llamagen / "vq_state_dict.pt",
        device="cpu",
    )
    g = torch.load(golden_llamagen / "golden.pt", weights_only=True)
    toks = m.tokenize((g["input_img_B3HW"] + 1) / 2)  # the adapter takes [0, 1] images
    assert torch.equal(toks, g["vq_idx_BN"])
    torch.testing.assert_close(m.decode(toks), ((g["vq_decode_code_B3HW"] + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.teacher_forced_logits(toks, g["label_B"]), g["gpt_logits_BNV"], atol=1e-5, rtol=0)
    assert torch.equal(m.generate(g["gen_cond"], cfg=4.0, top_k=1), g["gen_seq_BN"])


@torch.no_grad()
def test_llamagen_b_256_random_weights_generate_consistently():
    m = load_adapter("llamagen-b-256", device="cpu", seed=0)
    d = m.describe()
    assert (d["transformer_params"], d["tokenizer_params"]) == (110_888_448, 71_883_403)
    assert (d["token_grids"], d["blocks"], d["units_per_block"]) == ([[16, 16]], 12, 2048)
    assert m.transformer.output.weight.std() > 0.01  # the random head is not the official all-zero init
    gpt, cond = m.transformer, torch.tensor([207, 360])
    ids, step = gpt_lib.generate(gpt, cond, cfg_scale=2.0, greedy=True, return_logits=True, max_new_tokens=5)
    torch.testing.assert_close(step, _mixed_teacher_logits(gpt, ids, cond, 2.0, -1), atol=1e-4, rtol=1e-4)
