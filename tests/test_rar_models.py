"""Training paths of the RAR models: the tokenizer's straight-through forward and RAR's teacher forcing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iarmem_core.adapters.rar import RARAdapter
from iarmem_core.models.maskgit_vqgan import Conv2dSame, MaskGITVQGAN
from iarmem_core.models.rar import RAR
from iarmem_core.registry import get_spec


def _tiny_tokenizer() -> MaskGITVQGAN:
    torch.manual_seed(0)
    tok = RARAdapter.build_tokenizer(get_spec("test-rar"))
    RARAdapter.random_init(tok)
    return tok


def _tiny_rar() -> RAR:
    return RAR(**get_spec("test-rar").transformer).randomize_(torch.Generator().manual_seed(0))


def test_conv2d_same_matches_tf_padding():
    x = torch.randn(1, 2, 7, 6)
    for k, s in ((3, 1), (1, 1), (4, 1), (3, 2), (4, 2)):
        conv = Conv2dSame(2, 3, k, stride=s)
        out = conv(x)
        assert out.shape[-2:] == (-(-7 // s), -(-6 // s))  # ceil(size / stride)
        ph = max((-(-7 // s) - 1) * s + k - 7, 0)
        pw = max((-(-6 // s) - 1) * s + k - 6, 0)
        padded = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        ref = F.conv2d(padded, conv.weight, conv.bias, stride=s)
        torch.testing.assert_close(out, ref)


def test_tokenizer_training_forward_is_straight_through():
    tok = _tiny_tokenizer().train()
    img = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    recon, vq_loss = tok(img)
    with torch.no_grad():
        z = tok.encoder(img)
        zq, idx = tok.quantize(z)
        # forward value: the decoder of the nearest codes; loss: (1 + beta) * |z - e|^2 in value
        torch.testing.assert_close(recon, tok.decoder(zq), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vq_loss, 1.25 * F.mse_loss(z, zq))
    (F.mse_loss(recon, img) + vq_loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # the reconstruction loss reaches the encoder
    grad_rows = tok.quantize.embedding.weight.grad.abs().sum(1) > 0
    assert torch.equal(grad_rows, torch.isin(torch.arange(128), idx.unique()))  # only used codes move
    assert tok.decode(idx).min() >= 0 and tok.decode(idx).max() <= 1


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by 32"):
        MaskGITVQGAN(
            channel_mult=(1, 2),
            num_resolutions=2,
            hidden_channels=24,
            resolution=8,
            z_channels=8,
            num_embeddings=16,
            embedding_dim=8,
        )
    with pytest.raises(ValueError, match="must equal z_channels"):
        MaskGITVQGAN(
            channel_mult=(1, 2),
            num_resolutions=2,
            hidden_channels=32,
            resolution=8,
            z_channels=8,
            num_embeddings=16,
            embedding_dim=4,
        )


def test_rar_training_forward():
    gen = _tiny_rar()
    ids = torch.randint(0, 128, (3, 36), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 5, -1])
    gen.eval()
    logits, targets = gen(ids, labels)
    ref = gen.forward_fn(ids, torch.tensor([129 + 1, 129 + 5, 139]))
    torch.testing.assert_close(logits, ref[:, :-1], atol=0, rtol=0)
    assert torch.equal(targets, ids)
    # label dropout only when asked: probability 1 turns every label into the null class
    dropped, _ = gen(ids, labels, cond_drop_prob=1.0)
    torch.testing.assert_close(dropped, gen.forward_fn(ids, torch.full((3,), 139))[:, :-1], atol=0, rtol=0)
    # a random order permutes the targets; the loss is differentiable; dropout acts in train mode
    orders = gen.sample_orders(3, random_ratio=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(orders.sort(1).values, torch.arange(36).expand(3, -1))
    gen.train()
    logits_p, targets_p = gen(ids, labels, orders_BN=orders, cond_drop_prob=gen.class_label_dropout)
    assert torch.equal(targets_p, torch.gather(ids, 1, orders))
    F.cross_entropy(logits_p.reshape(-1, 128), targets_p.reshape(-1)).backward()
    assert gen.target_aware_pos_embed.grad[0, 2:38].abs().sum(-1).gt(0).all()
    assert gen.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0
    a, _ = gen(ids, labels)
    b, _ = gen(ids, labels)
    assert not torch.equal(a, b)  # dropout 0.1 is on in train mode
    assert torch.equal(gen.sample_orders(3, 0.0), torch.arange(36).expand(3, -1))


def test_official_init_is_adaln_zero_and_state_dict_has_no_hooks():
    gen = RAR(**get_spec("test-rar").transformer)
    assert gen.blocks[0].adaLN_modulation[1].weight.abs().sum() == 0
    assert gen.cls_token.abs().sum() == 0 and 0.01 < gen.pos_embed.std() < 0.03
    keys = list(gen.state_dict())
    assert not any("hook" in k or k == "attn_mask" for k in keys) and len(keys) == 4 + 2 * 18 + 1 + 4


def test_adapter_build_off_meta_has_a_real_causal_mask():
    gen = RARAdapter.build_transformer(get_spec("test-rar"))  # built on meta, then materialised
    mask = gen.attn_mask
    assert mask.shape == (38, 38) and mask.device.type == "cpu"
    assert torch.equal(torch.isinf(mask), torch.ones(38, 38, dtype=torch.bool).triu(1))
    assert (mask[~torch.isinf(mask)] == 0).all()


def test_random_weights_are_lively():
    """(Seeding per load is the adapter contract's, tests/test_adapter_contract.py.)"""
    from iarmem_core.adapters import load_adapter

    a = load_adapter("test-rar", device="cpu", seed=0)
    assert a.transformer.blocks[0].adaLN_modulation[1].weight.std() > 0.05  # not adaLN-zero
    img = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    assert a.tokenize(img).unique().numel() > 20  # the random codebook is spread over the encoder outputs
