"""train-demo end to end on tiny configs: files that load through the adapters, losses that go down."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from iarmem_core import data
from iarmem_core.adapters import adapter_class
from iarmem_core.demo import train as dt
from iarmem_core.registry import get_spec


def tiny_plan(name: str) -> dt.DemoPlan:
    """The registry's demo spec shrunk (narrow tokenizer codes, 2 blocks of width 64) on 40 unique images."""
    s = get_spec(name)
    if s.family == "var":
        tok = dict(s.tokenizer, vocab_size=64, z_channels=8)
        tr = dict(s.transformer, depth=2, embed_dim=64, num_heads=2)
        prefixes, main = (5, 14), 14
    else:
        tok = dict(s.tokenizer, num_embeddings=64, z_channels=8, embedding_dim=8)
        tr = dict(
            s.transformer,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            codebook_size=64,
        )
        prefixes, main = (16,), 16
    return dt.DemoPlan(
        dataclasses.replace(s, tokenizer=tok, transformer=tr),
        dt.TokenizerTrainConfig(steps=10, batch_size=8, warmup_steps=3, revive_every=5, probe_images=64),
        dt.TransformerTrainConfig(epochs=2, batch_size=64, warmup_steps=4, lr=3e-3, eval_every=0),
        prefixes,
        main,
        train_subset=40,
    )


@pytest.mark.parametrize("name", ["demo-var", "demo-rar"])
def test_tiny_train_demo_writes_loadable_assets_and_learns(tmp_path, name):
    torch.set_num_threads(1)  # tiny models: a second thread only adds OpenMP sync on a busy machine
    plan = tiny_plan(name)
    card = dt.train_demo_model(plan, tmp_path, seed=0, feature_net=None, log=lambda m: None, measure=False)
    d = tmp_path / name
    assert json.loads((d / "card.json").read_text()) == json.loads(json.dumps(card))

    # the fp16 files load strictly through the family adapter and give the card's parameter counts
    m = adapter_class(plan.spec.family).load(
        plan.spec,
        transformer_path=d / "transformer.safetensors",
        tokenizer_path=d / "tokenizer.safetensors",
        device="cpu",
    )
    assert card["architecture"]["transformer_params"] == sum(p.numel() for p in m.transformer.parameters())
    assert card["files"]["transformer"]["bytes"] == (d / "transformer.safetensors").stat().st_size

    # the stream is the bundle's, restricted to the 30 planted + 40 unique images: 30 x (4+16+64)/3 + 40
    tr = card["training"]["transformer"]
    assert tr["stream_length"] == 10 * (4 + 16 + 64) + 40
    assert tr["steps"] == 2 * (tr["stream_length"] // 64)
    # both parts learn: the transformer's epoch loss falls, and so does the tokenizer's
    losses = tr["loss_per_epoch"]
    assert losses[-1] < losses[0] - 0.2, losses
    tok_curve = [row[0] for row in card["training"]["tokenizer"]["loss_curve"]["total_rec_vq"]]
    assert np.mean(tok_curve[-3:]) < 0.7 * np.mean(tok_curve[:3]), tok_curve

    # the trained model tokenizes and generates with the layout of its spec
    x = data.load_demo("planted").images([0, 1])
    toks = m.flatten(m.tokenize(x))
    assert toks.shape == (2, m.n_tokens) and int(toks.max()) < m.vocab_size
    gen = m.flatten(m.generate(torch.tensor([0, 1]), prefix=toks, n_prefix=plan.main_prefix, top_k=1))
    assert torch.equal(gen[:, : plan.main_prefix], toks[:, : plan.main_prefix])


def test_training_stream_epochs_are_prefixes():
    """A longer run sees the same data in its first epochs: the curve of a long run is the curve of short ones."""
    a, b = data.demo_training_indices(0, 2), data.demo_training_indices(0, 5)
    assert np.array_equal(a, b[: len(a)])
    lr = [dt._lr_at(s, 100, None, 1e-3) for s in (99, 100, 5000)]
    assert lr == [1e-3, 1e-3, 1e-3]
