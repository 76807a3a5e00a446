"""Loading VAR weights: golden state dicts through the adapter, bad files, safetensors, full size on meta."""

from __future__ import annotations

import pytest
import torch

from iarmem_core.adapters import load_adapter
from iarmem_core.adapters.var import VARAdapter
from iarmem_core.checkpoints import CheckpointError, read_state_dict
from iarmem_core.registry import get_spec


class NotAStateDict:  # pickled by reference: a weights-only load must refuse it
    def __init__(self):
        self.x = 1


def _zero_stride_state_dict(module):
    """A state dict with the right keys, shapes and dtypes whose tensors share one element (bytes on disk)."""
    return {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in module.state_dict().items()}


def _meta(spec_name, part):
    spec = get_spec(spec_name)
    with torch.device("meta"):
        return VARAdapter.build_tokenizer(spec) if part == "tokenizer" else VARAdapter.build_transformer(spec)


@pytest.fixture(scope="module")
def vae_d16_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ckpt") / "vae_ch160v4096z32.pth"
    torch.save(_zero_stride_state_dict(_meta("var-d16", "tokenizer")), p)
    return p


@pytest.mark.golden
def test_adapter_with_golden_weights_reproduces_golden(golden_var):
    gold = torch.load(golden_var / "golden.pt", weights_only=True)
    m = VARAdapter.load(
        get_spec("test-var"),
        transformer_path=golden_var / "var_state_dict.pt",
        tokenizer_path=golden_var / "vae_state_dict.pt",
        device="cpu",
    )
    img01 = (gold["input_img_B3HW"] + 1) / 2
    toks = m.tokenize(img01)
    assert all(torch.equal(a, b) for a, b in zip(toks, gold["vae_idx_Bl_list"]))
    torch.testing.assert_close(
        m.teacher_forced_logits(toks, gold["label_B"]), gold["var_logits_BLV"], atol=1e-4, rtol=1e-4
    )
    prog = m.decode_progressive(toks)
    torch.testing.assert_close(torch.stack(prog), (gold["vae_recon_all_scales_SB3HW"] + 1) / 2, atol=1e-4, rtol=0)
    torch.testing.assert_close(m.decode(toks), prog[-1])
    gen = m.generate(gold["ar_label_B"], cfg=1.5, top_k=1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(gen, gold["ar_idx_Bl_list"]))
    torch.testing.assert_close(m.decode(gen), gold["ar_img_B3HW"], atol=1e-4, rtol=0)
    assert m.identity["transformer"].startswith("var_state_dict.pt:")


def test_full_size_loads_on_meta_with_assign(tmp_path, vae_d16_file):
    # a VAR-d16 file of the right layout whose tensors all share one element: loading it through meta +
    # assign=True keeps the file's tensors (one-element storages), so no full-size copy is ever allocated
    p = tmp_path / "var_d16.pth"
    torch.save(_zero_stride_state_dict(_meta("var-d16", "transformer")), p)
    assert p.stat().st_size < 200_000
    m = VARAdapter.load(get_spec("var-d16"), transformer_path=p, tokenizer_path=vae_d16_file, device="cpu")
    params = list(m.transformer.parameters()) + list(m.tokenizer.parameters())
    assert all(q.device.type == "cpu" and q.untyped_storage().nbytes() == 4 for q in params)
    d = m.describe()
    assert (d["transformer_params"], d["tokenizer_params"], d["blocks"], d["units_per_block"]) == (
        310_283_520,
        108_948_355,
        16,
        4096,
    )
    assert m.token_grids[-1] == (16, 16) and m.n_tokens == 680
    # the block-causal mask is recomputed after loading
    assert m.transformer.attn_bias_for_masking[0, 0, 0, 1] == -torch.inf and m.transformer.lvl_1L[0, -1] == 9


def test_wrong_depth_names_the_right_model(tmp_path, vae_d16_file):
    p = tmp_path / "var_d30.pth"
    torch.save(_zero_stride_state_dict(_meta("var-d30", "transformer")), p)
    with pytest.raises(CheckpointError, match="30 blocks found but var-d16 expects 16: this is var-d30"):
        VARAdapter.load(get_spec("var-d16"), transformer_path=p, tokenizer_path=vae_d16_file, device="cpu")


@pytest.mark.parametrize(
    "keys, label",
    [
        (
            {
                "cls_token": (1, 1, 64),
                "target_aware_pos_embed": (1, 40, 64),
                "blocks.0.adaLN_modulation.1.weight": (384, 64),
            },
            "a RAR transformer checkpoint",
        ),
        (
            {"tok_embeddings.weight": (128, 64), "layers.0.feed_forward.w1.weight": (256, 64)},
            "a LlamaGen GPT checkpoint",
        ),
    ],
)
def test_other_family_is_named(tmp_path, keys, label):
    p = tmp_path / "other.pt"
    torch.save({k: torch.zeros(s) for k, s in keys.items()}, p)
    with pytest.raises(CheckpointError, match=f"This is {label}, but test-var is a VAR model"):
        load_adapter("test-var", checkpoint=p, device="cpu")


def test_tokenizer_in_transformer_slot(tmp_path):
    p = tmp_path / "vae.pt"
    torch.save(_zero_stride_state_dict(_meta("test-var", "tokenizer")), p)
    with pytest.raises(CheckpointError, match="belongs in the tokenizer slot"):
        load_adapter("test-var", checkpoint=p, device="cpu")


def test_truncated_file(tmp_path):
    m = load_adapter("test-var", device="cpu")
    p = tmp_path / "var.pth"
    torch.save(m.transformer.state_dict(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_adapter("test-var", checkpoint=p, device="cpu")


def test_pickled_object_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"model": NotAStateDict()}, p)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_adapter("test-var", checkpoint=p, device="cpu")


def test_safetensors_round_trip_and_seeds(tmp_path):
    from safetensors.torch import save_file

    a = load_adapter("test-var-shared-aln", device="cpu", seed=7)
    b = load_adapter("test-var-shared-aln", device="cpu", seed=8)
    assert not torch.equal(a.transformer.head.weight, b.transformer.head.weight)
    save_file(a.transformer.state_dict(), str(tmp_path / "var.safetensors"))
    save_file(a.tokenizer.state_dict(), str(tmp_path / "vae.safetensors"))
    c = load_adapter(
        "test-var-shared-aln",
        checkpoint=tmp_path / "var.safetensors",
        tokenizer_checkpoint=tmp_path / "vae.safetensors",
        device="cpu",
    )
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    toks = a.tokenize(img)
    assert all(torch.equal(x, y) for x, y in zip(toks, c.tokenize(img)))
    assert torch.equal(a.teacher_forced_logits(toks, [0, 3]), c.teacher_forced_logits(toks, [0, 3]))
    assert c.identity["transformer"].startswith("var.safetensors:")
    # the same seed gives the same random weights
    d = load_adapter("test-var-shared-aln", device="cpu", seed=7)
    assert torch.equal(a.teacher_forced_logits(toks, [0, 3]), d.teacher_forced_logits(toks, [0, 3]))


def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path):
    p = tmp_path / "var_d16.pth"
    p.write_text("<html>404 Not Found</html>\n")  # e.g. an error page saved under the checkpoint's name
    with pytest.raises(CheckpointError, match=r"var_d16\.pth: not a PyTorch checkpoint: it is neither a zip"):
        read_state_dict(p)
