"""LlamaGen checkpoint files: the official wrappers load; wrong files fail with a message naming them."""

from __future__ import annotations

import argparse

import pytest
import torch

from iarmem_core.adapters import load_adapter
from iarmem_core.adapters.llamagen import LlamaGenAdapter
from iarmem_core.checkpoints import CheckpointError
from iarmem_core.registry import get_spec

pytestmark = [pytest.mark.golden, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def official(golden_llamagen):
    """(gpt state dict, vq state dict, golden tensors) of the official tiny models."""
    load = lambda name: torch.load(golden_llamagen / name, weights_only=True)  # noqa: E731
    return load("gpt_state_dict.pt"), load("vq_state_dict.pt"), load("golden.pt")


def _logits(m, g) -> torch.Tensor:
    return m.teacher_forced_logits(g["vq_idx_BN"], g["label_B"])


def _zero_stride_sd(model_fn) -> dict:
    """The keys and shapes of a (meta-built) model, every tensor a zero-stride view of one zero."""
    with torch.device("meta"):
        m = model_fn()
    return {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in m.state_dict().items()}


def test_training_checkpoints_with_args_and_ema_load_the_model_weights(tmp_path, official):
    gpt_sd, vq_sd, g = official
    args = argparse.Namespace(gpt_model="GPT-B", ema=True, lr=1e-4, results_dir="results", cfg_scale=None)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    ema = {k: v + 1.0 for k, v in gpt_sd.items()}  # a different set of weights: must not be picked
    torch.save({"model": gpt_sd, "optimizer": opt, "steps": 1000, "args": args, "ema": ema}, tmp_path / "gpt.pt")
    torch.save(
        {
            "model": vq_sd,
            "optimizer": opt,
            "discriminator": {"w": torch.ones(2)},
            "optimizer_disc": opt,
            "steps": 5,
            "args": args,
        },
        tmp_path / "vq.pt",
    )
    m = load_adapter(
        "test-llamagen", checkpoint=tmp_path / "gpt.pt", tokenizer_checkpoint=tmp_path / "vq.pt", device="cpu"
    )
    torch.testing.assert_close(_logits(m, g), g["gpt_logits_BNV"], atol=1e-5, rtol=0)
    assert torch.equal(m.tokenize((g["input_img_B3HW"] + 1) / 2), g["vq_idx_BN"])


@pytest.mark.parametrize("layout", ["fsdp_raw_with_freqs_cis", "module", "state_dict"])
def test_fsdp_raw_and_other_wrappers_load(tmp_path, official, layout):
    gpt_sd, vq_sd, g = official
    if layout == "fsdp_raw_with_freqs_cis":  # the file is the state dict, with a stray RoPE table
        obj = {**gpt_sd, "freqs_cis": torch.zeros(37, 8, 2)}
    else:
        obj = {layout: gpt_sd}
    torch.save(obj, tmp_path / "gpt.pt")
    torch.save(vq_sd, tmp_path / "vq.pt")
    m = load_adapter(
        "test-llamagen", checkpoint=tmp_path / "gpt.pt", tokenizer_checkpoint=tmp_path / "vq.pt", device="cpu"
    )
    torch.testing.assert_close(_logits(m, g), g["gpt_logits_BNV"], atol=1e-5, rtol=0)
    torch.testing.assert_close(m.transformer.freqs_cis, g["gpt_freqs_cis"])  # recomputed, not taken from the file


def test_wrong_depth_names_the_matching_model(tmp_path):
    spec_l = get_spec("llamagen-l-256")
    gpt_l = _zero_stride_sd(lambda: LlamaGenAdapter.build_transformer(spec_l))
    vq16 = _zero_stride_sd(lambda: LlamaGenAdapter.build_tokenizer(spec_l))
    torch.save({"model": gpt_l}, tmp_path / "c2i_L_256.pt")
    torch.save({"model": vq16}, tmp_path / "vq_ds16_c2i.pt")
    assert (tmp_path / "c2i_L_256.pt").stat().st_size < 500_000  # 343M parameters stored as single zeros
    with pytest.raises(CheckpointError) as e:
        load_adapter(
            "llamagen-b-256",
            checkpoint=tmp_path / "c2i_L_256.pt",
            tokenizer_checkpoint=tmp_path / "vq_ds16_c2i.pt",
            device="cpu",
        )
    msg = str(e.value)
    assert "c2i_L_256.pt" in msg and "24 blocks found but llamagen-b-256 expects 12" in msg
    assert "this is llamagen-l-256 or llamagen-l-384" in msg


@pytest.mark.parametrize(
    "family,keys",
    [
        ("VAR", {"pos_start": (1, 1, 1024), "lvl_1L": (1, 680), "blocks.0.ffn.fc1.weight": (4096, 1024)}),
        (
            "RAR",
            {
                "target_aware_pos_embed": (1, 1280, 768),
                "cls_token": (1, 1, 768),
                "blocks.0.adaLN_modulation.1.weight": (4608, 768),
            },
        ),
    ],
)
def test_other_family_file_is_named(tmp_path, official, family, keys):
    _, vq_sd, _ = official
    torch.save({k: torch.zeros(1).expand(s) for k, s in keys.items()}, tmp_path / "other.pth")
    torch.save(vq_sd, tmp_path / "vq.pt")
    with pytest.raises(
        CheckpointError,
        match=f"This is a {family} transformer checkpoint, but test-llamagen is a LLAMAGEN model",
    ):
        load_adapter(
            "test-llamagen",
            checkpoint=tmp_path / "other.pth",
            tokenizer_checkpoint=tmp_path / "vq.pt",
            device="cpu",
        )


def test_swapped_slots_and_truncated_file(tmp_path, official):
    gpt_sd, vq_sd, _ = official
    torch.save({"model": vq_sd}, tmp_path / "vq.pt")
    torch.save({"model": gpt_sd}, tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="LlamaGen VQ tokenizer checkpoint; it belongs in the tokenizer slot"):
        load_adapter(
            "test-llamagen",
            checkpoint=tmp_path / "vq.pt",
            tokenizer_checkpoint=tmp_path / "vq.pt",
            device="cpu",
        )
    data = (tmp_path / "gpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: the file is truncated"):
        load_adapter(
            "test-llamagen",
            checkpoint=tmp_path / "cut.pt",
            tokenizer_checkpoint=tmp_path / "vq.pt",
            device="cpu",
        )
