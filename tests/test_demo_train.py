"""The world's training loop on tiny configs: it learns, it is reproducible from its seed, and the weights it
writes load through the adapters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from iarmem_core.adapters import adapter_class
from iarmem_core.demo import train as dt
from iarmem_core.demo import world
from iarmem_core.registry import get_spec

EPOCHS = 6


def tiny(name: str):
    """The registry's demo spec shrunk (2 blocks of width 64, a 64-code tokenizer), random weights (no files)."""
    s = get_spec(name)
    if s.family == "var":
        spec = dataclasses.replace(
            s,
            bundled={},
            tokenizer=dict(s.tokenizer, vocab_size=64, z_channels=8),
            transformer=dict(s.transformer, depth=2, embed_dim=64, num_heads=2),
        )
    else:
        spec = dataclasses.replace(
            s,
            bundled={},
            tokenizer=dict(s.tokenizer, num_embeddings=64, z_channels=8, embedding_dim=8),
            transformer=dict(
                s.transformer,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                codebook_size=64,
            ),
        )
    ad = adapter_class(spec.family).load(spec, device="cpu", seed=0)
    return spec, ad


def _run(spec, ad, tokens_VN, labels_V, seed: int):
    model = dt.build_transformer_for_training(spec, seed)
    cfg = world.PlantConfig(lr=3e-3, warmup_steps=4, batch_size=16)
    n = len(labels_V) // 2
    streams = lambda e: np.random.default_rng([seed, e]).permutation(n)  # noqa: E731
    st = world.train_epochs(model, spec, ad.tokenizer, tokens_VN, labels_V, streams, EPOCHS, cfg, seed, lambda m: None)
    return model, st


@pytest.mark.parametrize("name", ["demo-var", "demo-rar"])
def test_tiny_world_training_learns_is_seeded_and_its_weights_load(name, tmp_path):
    torch.set_num_threads(1)
    spec, ad = tiny(name)
    g = torch.Generator().manual_seed(0)
    # 32 images with fixed token rows (each image and its mirror): a task the model can learn
    flat = torch.randint(0, ad.vocab_size, (32, ad.n_tokens), generator=g)
    tokens_VN = flat.repeat_interleave(2, dim=0)
    labels_V = torch.arange(32).remainder(10).repeat_interleave(2)
    a, st = _run(spec, ad, tokens_VN, labels_V, seed=1)
    losses = st["loss_per_epoch"]
    assert len(losses) == EPOCHS and losses[-1] < losses[0] - 0.05, losses
    assert st["steps"] == EPOCHS * (32 // 16)
    b, _ = _run(spec, ad, tokens_VN, labels_V, seed=1)  # the same seed: the same weights, bit for bit
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    # the fp16 file loads strictly through the family adapter
    path = tmp_path / "transformer.safetensors"
    dt.save_weights(a, path)
    m = adapter_class(spec.family).load(spec, transformer_path=path, device="cpu", seed=0)
    assert sum(p.numel() for p in m.transformer.parameters()) == dt.n_params(a)
