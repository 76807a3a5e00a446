"""Bad checkpoint files given to RAR: a wrong size, another family, a truncated file, a swapped slot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iarmem_core.adapters import load_adapter
from iarmem_core.adapters.rar import RARAdapter
from iarmem_core.checkpoints import CheckpointError
from iarmem_core.registry import get_spec


def _zero_stride_file(module_on_meta: torch.nn.Module, path: Path) -> Path:
    """Save a full-shape state dict whose tensors are expanded views of one zero: a few kB on disk."""
    sd = {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in module_on_meta.state_dict().items()}
    torch.save(sd, path)
    assert path.stat().st_size < 200_000
    return path


@pytest.mark.parametrize(
    "size,expect",
    [
        ("xl", "32 blocks found but rar-b expects 24: this is rar-xl"),
        ("l", "width 1024 found but rar-b expects 768: this is rar-l"),
    ],
)
def test_wrong_size_names_the_right_model(tmp_path: Path, size: str, expect: str):
    with torch.device("meta"):
        other = RARAdapter.build_transformer(get_spec(f"rar-{size}"))
        tok = RARAdapter.build_tokenizer(get_spec("rar-b"))
    other_file = _zero_stride_file(other, tmp_path / f"rar_{size}.bin")
    tok_file = _zero_stride_file(tok, tmp_path / "maskgit-vqgan-imagenet-f16-256.bin")
    with pytest.raises(CheckpointError) as e:
        load_adapter("rar-b", checkpoint=other_file, tokenizer_checkpoint=tok_file, device="cpu")
    msg = str(e.value)
    assert f"rar_{size}.bin" in msg and expect in msg


def test_full_size_zero_file_loads_into_the_right_model(tmp_path: Path):
    """The same kind of file with the right shapes passes the checks and loads strictly."""
    with torch.device("meta"):
        gen = RARAdapter.build_transformer(get_spec("rar-b"))
    f = _zero_stride_file(gen, tmp_path / "rar_b.bin")
    from iarmem_core import checkpoints

    with torch.device("meta"):
        target = RARAdapter.build_transformer(get_spec("rar-b"))
    checkpoints.load_checked(target, f, expected="rar-b", component="transformer")
    target.init_non_persistent()
    assert target.pos_embed.shape == (1, 1280, 768) and target.pos_embed.device.type == "cpu"
    assert target.attn_mask.shape == (258, 258) and target.attn_mask.device.type == "cpu"


@pytest.mark.parametrize(
    "family,keys,label",
    [
        ("var", {"pos_start": [1, 1, 64], "lvl_1L": [1, 30], "blocks.0.ffn.fc1.weight": [256, 64]}, "a VAR"),
        ("llamagen", {"tok_embeddings.weight": [128, 64], "layers.0.feed_forward.w1.weight": [256, 64]}, "a LlamaGen"),
    ],
)
def test_other_family_file_is_named(tmp_path: Path, family: str, keys: dict, label: str):
    f = tmp_path / f"{family}.pth"
    torch.save({k: torch.zeros(shape) for k, shape in keys.items()}, f)
    with pytest.raises(CheckpointError, match=f"This is {label} .*checkpoint, but test-rar is a RAR model"):
        load_adapter("test-rar", checkpoint=f, device="cpu")


def test_tokenizer_file_in_transformer_slot(tmp_path: Path):
    tok = RARAdapter.build_tokenizer(get_spec("test-rar"))
    f = tmp_path / "tok.pt"
    torch.save(tok.state_dict(), f)
    with pytest.raises(CheckpointError, match="belongs in the tokenizer slot"):
        load_adapter("test-rar", checkpoint=f, device="cpu")


def test_truncated_file(tmp_path: Path):
    gen = RARAdapter.build_transformer(get_spec("test-rar"))
    RARAdapter.random_init(gen)
    good = tmp_path / "good.pt"
    torch.save(gen.state_dict(), good)
    bad = tmp_path / "rar_cut.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="rar_cut.pt.*truncated"):
        load_adapter("test-rar", checkpoint=bad, device="cpu")
    m = load_adapter("test-rar", checkpoint=good, device="cpu")  # the intact file loads and matches
    assert torch.equal(m.transformer.lm_head.weight, gen.lm_head.weight)
