"""The multi-scale VQVAE: Phi layouts, the differentiable training forward, encode/decode invariants."""

from __future__ import annotations

import pytest
import torch

from iarmem_core.adapters.var import VARAdapter
from iarmem_core.models.vqvae_ms import VQVAE

TINY = dict(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4))


def _tiny(**kw) -> VQVAE:
    torch.manual_seed(0)
    vae = VQVAE(**{**TINY, **kw})
    VARAdapter.random_init(vae)
    return vae


def _img(B=4, seed=0):
    return torch.rand(B, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "share, n_scales, keys",
    [
        (
            0,
            3,
            ["quantize.quant_resi.0.weight", "quantize.quant_resi.1.weight", "quantize.quant_resi.2.weight"],
        ),
        (1, 3, ["quantize.quant_resi.qresi.weight"]),
        (4, 3, [f"quantize.quant_resi.qresi_ls.{k}.weight" for k in range(4)]),
    ],
)
def test_phi_state_dict_layouts(share, n_scales, keys):
    sd = VQVAE(**TINY, share_quant_resi=share).state_dict()
    assert sorted(k for k in sd if k.startswith("quantize.quant_resi") and k.endswith("weight")) == keys
    assert sd["quantize.ema_vocab_hit_SV"].shape == (n_scales, 32)
    assert not any("quant_resi" in k for k in VQVAE(**TINY, quant_resi=0.0).state_dict())  # Phi = identity


def test_phi_choice_per_scale():
    # 4 shared Phi over the 10 VAR-256 scales: ticks 1/12, 5/12... nearest to si/9
    q = VQVAE(vocab_size=8, z_channels=4, ch=32, ch_mult=(1,), v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)).quantize
    picks = [q.quant_resi._phis.index(q.phi(si, 10)) for si in range(10)]
    assert picks == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    q2 = VQVAE(**TINY, share_quant_resi=2).quantize  # K=2: ticks 1/4, 3/4
    assert [q2.quant_resi._phis.index(q2.phi(si, 3)) for si in range(3)] == [0, 0, 1]


def test_phi_value():
    vae = _tiny()
    phi = vae.quantize.phi(1, 3)
    h = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(phi(h), 0.5 * h + 0.5 * torch.nn.functional.conv2d(h, phi.weight, phi.bias, padding=1))


def test_training_forward_loss_and_straight_through():
    vae = _tiny(test_mode=False, beta=0.25)
    img = _img()
    f = vae.img_to_f(img).detach().requires_grad_(True)
    f_st, loss = vae.quantize(f)
    fhats = vae.quantize.f_to_idxBl_or_fhat(f.detach(), to_fhat=True)
    # value: f_hat after the last scale; loss: mean over scales of (1 + beta) * mse(f_hat_si, f)
    torch.testing.assert_close(f_st, fhats[-1])
    ref = sum(torch.mean((fh - f.detach()) ** 2) for fh in fhats) / 3 * 1.25
    torch.testing.assert_close(loss, ref)
    # straight-through: d f_st / d f is the identity
    w = torch.randn_like(f)
    (g_st,) = torch.autograd.grad((f_st * w).sum(), f, retain_graph=True)
    torch.testing.assert_close(g_st, w)
    # the loss reaches f only through the commitment term beta * mean_si 2 (f - f_hat_si) / numel
    (g_loss,) = torch.autograd.grad(loss, f, retain_graph=True)
    ref_g = sum(2 * (f.detach() - fh) / f.numel() for fh in fhats) / 3 * 0.25
    torch.testing.assert_close(g_loss, ref_g)
    # and trains the codebook and the Phi convs
    loss.backward()
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert vae.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0


def test_train_mode_records_codebook_hits():
    vae = _tiny(test_mode=False).train()
    img = _img(B=3)
    idx = vae.img_to_idxBl(img)
    vae(img)
    hits = vae.quantize.ema_vocab_hit_SV
    for si, idx_Bl in enumerate(idx):
        assert torch.equal(hits[si], idx_Bl.flatten().bincount(minlength=32).float())
    vae.eval()(img)
    assert torch.equal(vae.quantize.ema_vocab_hit_SV, hits)  # eval mode leaves the statistic alone


def test_a_few_training_steps_reduce_the_loss():
    vae = _tiny(test_mode=False).train()
    img = _img(B=4, seed=1)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        rec, vq = vae(img)
        loss = torch.mean((rec - img) ** 2) + vq
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_encode_decode_invariants():
    vae = _tiny()
    img = _img()
    idx = vae.img_to_idxBl(img)
    assert [t.shape for t in idx] == [(4, 1), (4, 4), (4, 16)]
    recs = vae.idxBl_to_img(idx, same_shape=True, last_one=False)
    torch.testing.assert_close(recs[-1], vae.idxBl_to_img(idx, same_shape=True, last_one=True))
    torch.testing.assert_close(torch.stack(recs), torch.stack(vae.img_to_reconstructed_img(img)))
    # the teacher-forcing input of scale si+1 is the area-downsampled f_hat after scale si
    fhats = vae.quantize.f_to_idxBl_or_fhat(vae.img_to_f(img), to_fhat=True)
    x = vae.quantize.idxBl_to_var_input(idx)
    assert x.shape == (4, 4 + 16, 4)
    torch.testing.assert_close(
        x[:, :4], torch.nn.functional.adaptive_avg_pool2d(fhats[0], 2).flatten(2).transpose(1, 2)
    )
    torch.testing.assert_close(x[:, 4:], fhats[1].flatten(2).transpose(1, 2))
    # the next autoregressive input chain ends at the same f_hat
    f_hat = torch.zeros_like(fhats[0])
    for si, h in enumerate(vae.quantize.idxBl_to_h(idx)):
        f_hat, _ = vae.quantize.get_next_autoregressive_input(si, 3, f_hat, h)
        torch.testing.assert_close(f_hat, fhats[si])
