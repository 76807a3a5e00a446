"""Metrics: Frechet distance against closed forms, similarity measures, user-file loaders, FeatureNet."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file
from torch import nn

from iarmem_core.checkpoints import CheckpointError
from iarmem_core.demo.features import train_feature_net
from iarmem_core.metrics import (
    SIMILARITY_MEASURES,
    DemoFeatureSpace,
    FeatureNet,
    FeatureNetConfig,
    InceptionFeatureSpace,
    SSCDFeatureSpace,
    calibrate_threshold,
    class_accuracy,
    feature_cosine,
    feature_space,
    frechet_distance,
    frechet_distance_images,
    load_feature_card,
    load_feature_net,
    save_feature_net,
    similarity_measure,
    ssim,
    token_match_rate,
)
from iarmem_core.metrics.spaces import IMAGENET_MEAN, IMAGENET_STD


# ---------------------------------------------------------------------------------------------------
# Frechet distance
def _closed_form_fd(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)), computed independently with scipy (float64)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussian(n, mu, cov, gen):
    chol = torch.linalg.cholesky(torch.as_tensor(cov))
    return torch.as_tensor(mu) + torch.randn(n, len(mu), generator=gen, dtype=torch.float64) @ chol.T


@pytest.fixture(scope="module")
def gaussians():
    gen = torch.Generator().manual_seed(0)
    d = 6
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, d, generator=gen, dtype=torch.float64)
    s1 = (a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)).numpy()
    s2 = (b @ b.T / d + 0.1 * torch.eye(d, dtype=torch.float64)).numpy()
    mu1 = np.zeros(d)
    mu2 = np.linspace(-1, 1, d)
    x = _gaussian(100_000, mu1, s1, gen)
    y = _gaussian(100_000, mu2, s2, gen)
    return x, y, (mu1, s1, mu2, s2)


def test_frechet_matches_closed_form_of_known_gaussians(gaussians):
    x, y, params = gaussians
    expected = _closed_form_fd(*params)  # 3.4 for this seed
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.02)


def test_frechet_equals_direct_computation_on_sample_statistics(gaussians):
    x, y, _ = gaussians
    x, y = x[:3000], y[:2000]  # different sizes
    xn, yn = x.numpy(), y.numpy()
    direct = _closed_form_fd(xn.mean(0), np.cov(xn, rowvar=False), yn.mean(0), np.cov(yn, rowvar=False))
    assert frechet_distance(x, y) == pytest.approx(direct, rel=1e-8)
    assert frechet_distance(x.float(), y.float()) == pytest.approx(direct, rel=1e-5)


def test_frechet_is_zero_for_identical_sets_and_symmetric(gaussians):
    x, y, _ = gaussians
    x, y = x[:5000], y[:4000]
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, y) > 1.0


def test_frechet_is_translation_invariant_far_from_the_origin(gaussians):
    x, y, _ = gaussians
    x, y = x[:5000], y[:4000]
    shift = 1e6  # one-pass covariance without centering would lose most digits here
    assert frechet_distance(x + shift, y + shift) == pytest.approx(frechet_distance(x, y), rel=1e-6)


def test_frechet_rejects_mismatched_feature_sizes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.randn(1, 4), torch.randn(10, 4))


# ---------------------------------------------------------------------------------------------------
# Image and token similarities
def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(4, 3, 32, 32, generator=gen) * 0.5 + 0.25
    s_same = ssim(a, a)
    s_small = ssim(a, (a + 0.03 * torch.randn(a.shape, generator=gen)).clamp(0, 1))
    s_big = ssim(a, (a + 0.2 * torch.randn(a.shape, generator=gen)).clamp(0, 1))
    assert s_same.shape == (4,)
    torch.testing.assert_close(s_same, torch.ones(4), atol=1e-5, rtol=0)
    assert (s_small < 0.999).all() and (s_big < s_small).all()


def test_images_outside_unit_range_are_refused():
    a = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ssim(a * 2 - 1, a)
    with pytest.raises(ValueError, match="uint8"):
        ssim((a * 255).to(torch.uint8), a)


def test_token_match_rate_known_answers():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5]])
    b = torch.tensor([[1, 2, 0, 4], [0, 0, 0, 0], [5, 5, 5, 5]])
    torch.testing.assert_close(token_match_rate(a, b), torch.tensor([0.75, 0.0, 1.0]))
    torch.testing.assert_close(token_match_rate(a, b, start=2), torch.tensor([0.5, 0.0, 1.0]))
    # VAR: per-scale maps, concatenated coarse to fine: 1 + 4 tokens
    a_scales = [torch.tensor([[7]]), torch.tensor([[[1, 2], [3, 4]]])]
    b_scales = [torch.tensor([[7]]), torch.tensor([[[1, 0], [3, 0]]])]
    torch.testing.assert_close(token_match_rate(a_scales, b_scales), torch.tensor([0.6]))
    torch.testing.assert_close(token_match_rate(a_scales, b_scales, start=1), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="start=4"):
        token_match_rate(a, b, start=4)


@pytest.fixture(scope="module")
def random_net():
    torch.manual_seed(0)
    return FeatureNet().eval()


def test_feature_cosine_is_one_for_identical_images(random_net):
    space = DemoFeatureSpace(random_net, device="cpu", batch_size=3)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(5, 3, 32, 32, generator=gen), torch.rand(5, 3, 32, 32, generator=gen)
    torch.testing.assert_close(feature_cosine(space, a, a), torch.ones(5), atol=1e-5, rtol=0)
    assert (feature_cosine(space, a, b) < 0.9999).all()
    assert space.features(a).shape == (5, 128)


# ---------------------------------------------------------------------------------------------------
# User-supplied TorchScript files, replaced by tiny stand-ins the tests script themselves
class _SSCDStandIn(nn.Module):
    """Embeds what reached it: [H/320, W/320, per-channel mean (3), per-channel std (3)]."""

    def forward(self, x):
        b = x.shape[0]
        hw = torch.tensor([x.shape[2] / 320.0, x.shape[3] / 320.0], device=x.device).expand(b, 2)
        return torch.cat([hw, x.mean(dim=(2, 3)), x.flatten(2).std(dim=2)], dim=1)


class _InceptionStandIn(nn.Module):
    """Like inception-2015-12-05.pt: logits by default, 2048-d features with return_features=True."""

    def forward(self, x, return_features: bool = False):
        b = x.shape[0]
        if not return_features:
            return torch.zeros(b, 1008, device=x.device)
        stats = torch.stack([x.amax(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3))], dim=1)
        return torch.cat([stats, torch.zeros(b, 2045, device=x.device)], dim=1)


class _WrongDimInception(nn.Module):
    def forward(self, x, return_features: bool = False):
        return x.mean(dim=(2, 3)).repeat(1, 10)  # 30-d, not 2048


def _script(module: nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* is deprecated in torch 2.13
        torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def test_sscd_loader_resizes_to_320_and_normalises(tmp_path):
    path = _script(_SSCDStandIn(), tmp_path / "sscd_disc_mixup.torchscript.pt")
    space = SSCDFeatureSpace(path, device="cpu")
    values = torch.tensor([0.2, 0.5, 0.9])
    img = values[None, :, None, None].expand(1, 3, 32, 32)  # constant image, 32x32
    norm = (values - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    expected = torch.cat([torch.ones(2), norm, torch.zeros(3)])
    expected = expected / expected.norm()
    torch.testing.assert_close(space.features(img)[0], expected, atol=1e-5, rtol=0)
    assert space.dim == 8


def test_sscd_cosine_of_identical_images_is_one(tmp_path):
    path = _script(_SSCDStandIn(), tmp_path / "sscd.pt")
    measure = similarity_measure("sscd", sscd=path)
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(3, 3, 64, 48, generator=gen)
    b = torch.rand(3, 3, 64, 48, generator=gen) * 0.3
    res = measure(torch.cat([a, a]), torch.cat([a, b]))
    assert res.measure == "sscd" and res.threshold == 0.75 and res.threshold_source.startswith("published")
    torch.testing.assert_close(res.scores[:3], torch.ones(3), atol=1e-5, rtol=0)
    assert (res.scores[3:] < 0.999).all()
    assert res.similar[:3].all()


def test_torchscript_loaders_refuse_other_files_clearly(tmp_path):
    state_dict = tmp_path / "sscd_state_dict.pt"
    torch.save({"w": torch.zeros(3)}, state_dict)
    with pytest.raises(CheckpointError, match="torch.save checkpoint.*sscd_disc_mixup.torchscript.pt"):
        SSCDFeatureSpace(state_dict, device="cpu")
    junk = tmp_path / "inception-2015-12-05.pt"
    junk.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="not a TorchScript archive.*inception-2015-12-05.pt"):
        InceptionFeatureSpace(junk, device="cpu")
    with pytest.raises(CheckpointError, match="no such file"):
        SSCDFeatureSpace(tmp_path / "missing.pt", device="cpu")


def test_inception_loader_passes_8bit_levels_and_checks_the_module(tmp_path):
    space = InceptionFeatureSpace(_script(_InceptionStandIn(), tmp_path / "inc.pt"), device="cpu")
    img = torch.zeros(2, 3, 40, 40)
    img[0, :, :20] = 1.0
    img[1] = 0.2
    f = space.features(img)
    assert f.shape == (2, 2048)
    torch.testing.assert_close(f[:, :2], torch.tensor([[255.0, 0.0], [51.0, 51.0]]))
    # the SSCD stand-in has no return_features argument; the wrong-dim module returns 30-d features
    with pytest.raises(CheckpointError, match="fails as Inception FID"):
        InceptionFeatureSpace(_script(_SSCDStandIn(), tmp_path / "sscd.pt"), device="cpu")
    with pytest.raises(CheckpointError, match="2048"):
        InceptionFeatureSpace(_script(_WrongDimInception(), tmp_path / "wrong.pt"), device="cpu")


def test_frechet_results_are_labelled_by_feature_space(tmp_path, random_net):
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(8, 3, 32, 32, generator=gen), torch.rand(8, 3, 32, 32, generator=gen) * 0.5
    fid = frechet_distance_images(
        InceptionFeatureSpace(_script(_InceptionStandIn(), tmp_path / "i.pt"), device="cpu"), a, b
    )
    assert fid.metric == "FID" and fid.comparable_to_published_fid and fid.dim == 2048
    fd = frechet_distance_images(DemoFeatureSpace(random_net, device="cpu"), a, b)
    assert fd.metric == "FD[demo-fashion-cnn]" and not fd.comparable_to_published_fid
    assert fd.to_dict()["feature_space"] == "demo-fashion-cnn" and fd.value > 0


# ---------------------------------------------------------------------------------------------------
# FeatureNet: training, files, class accuracy
def _stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes: a bright band at rows 8k..8k+7 on noise (mirror-symmetric, so flips keep the label)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.rand(n, 3, 32, 32, generator=gen) * 0.4
    for k in range(4):
        x[y == k, :, 8 * k : 8 * k + 8] += 0.5
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    x, y = _stripes(384, seed=5)
    cfg = FeatureNetConfig(width=8, n_classes=4)
    return train_feature_net(x, y, epochs=3, batch_size=32, seed=0, config=cfg)


def test_feature_net_learns_a_separable_task(trained):
    net, stats = trained
    x_test, y_test = _stripes(256, seed=6)
    assert class_accuracy(net, x_test, y_test) >= 0.95
    assert stats["steps"] == 3 * (384 // 32) and len(stats["loss_per_epoch"]) == 3
    assert stats["loss_per_epoch"][-1] < stats["loss_per_epoch"][0]


def test_feature_net_training_is_seeded():
    x, y = _stripes(64, seed=7)
    cfg = FeatureNetConfig(width=4, feat_dim=16, n_classes=4)
    n1, _ = train_feature_net(x, y, epochs=1, batch_size=16, seed=3, config=cfg)
    n2, _ = train_feature_net(x, y, epochs=1, batch_size=16, seed=3, config=cfg)
    for (k, v1), v2 in zip(n1.state_dict().items(), n2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_feature_net_save_load_round_trip(tmp_path, trained):
    net, stats = trained
    path = tmp_path / "demo-fashion-cnn.safetensors"
    card_file = save_feature_net(net, path, card={"data": "stripes", "epochs": stats["epochs"]})
    loaded = load_feature_net(path)
    assert loaded.config == net.config and not loaded.training
    for (k, v), w in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    x, _ = _stripes(16, seed=8)
    assert torch.equal(net(x), loaded(x)) and torch.equal(net.features(x), loaded.features(x))
    from_file = feature_space("demo-fashion-cnn", path, device="cpu")
    assert torch.equal(from_file.features(x), net.features(x))
    card = load_feature_card(path)
    assert card == json.loads(card_file.read_text())
    assert card["data"] == "stripes" and card["config"]["n_classes"] == 4
    assert card["feature_space"] == "demo-fashion-cnn"


def test_load_feature_net_refuses_wrong_files(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="not an iarmem feature network.*weight"):
        load_feature_net(other)
    pt = tmp_path / "net.pt"
    torch.save(FeatureNet().state_dict(), pt)
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        load_feature_net(pt)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_feature_net(broken)


class _MeanThreshold(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5, else class 0."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=1) + self.dummy


def test_class_accuracy_known_answer():
    x = torch.stack([torch.full((3, 8, 8), v) for v in (0.2, 0.8, 0.9, 0.1)])
    clf = _MeanThreshold().eval()
    assert class_accuracy(clf, x, torch.tensor([0, 1, 0, 0]), batch_size=3) == 0.75
    with pytest.raises(ValueError, match="training mode"):
        class_accuracy(clf.train(), x, torch.tensor([0, 1, 0, 0]))


# ---------------------------------------------------------------------------------------------------
# Registry and calibration
def test_registry_names_thresholds_and_strict_decisions(random_net):
    assert set(SIMILARITY_MEASURES) == {"sscd", "ssim", "feature_cosine", "token_match"}
    assert SIMILARITY_MEASURES["sscd"].default_threshold == 0.75
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 3, 0], [1, 2, 0, 0]])
    tm = similarity_measure("token_match", threshold=0.75)
    res = tm(a, b)  # scores 0.75 and 0.5: equal to the threshold is not a copy
    assert res.measure == "token_match" and res.similar.tolist() == [False, False]
    assert tm.with_threshold(0.7)(a, b).similar.tolist() == [True, False]
    assert similarity_measure("token_match", token_start=2, threshold=0.4)(a, b).scores.tolist() == [0.5, 0.0]
    fc = similarity_measure("feature-cosine", feature_space=DemoFeatureSpace(random_net, device="cpu"))
    assert fc.name == "feature_cosine[demo-fashion-cnn]" and fc.threshold_source.startswith("uncalibrated")
    with pytest.raises(ValueError, match="sscd_disc_mixup.torchscript.pt"):
        similarity_measure("sscd")
    with pytest.raises(ValueError, match="unknown similarity .*expected one of"):
        similarity_measure("lpips")
    with pytest.raises(ValueError, match="inception-2015-12-05.pt"):
        feature_space("inception-v3-fid")


def test_calibrate_threshold_known_answers():
    diff = torch.linspace(0.1, 1.0, 10)  # 0.1, 0.2, ..., 1.0
    same = torch.tensor([0.95, 0.85, 0.5])
    c = calibrate_threshold(same, diff, max_false_rate=0.1)
    assert c.threshold == pytest.approx(0.9) and c.false_rate == pytest.approx(0.1)
    assert c.true_rate == pytest.approx(1 / 3) and (c.n_same, c.n_different) == (3, 10)
    c = calibrate_threshold(same, diff, max_false_rate=0.25)  # 2 false positives allowed
    assert c.threshold == pytest.approx(0.8) and c.false_rate == pytest.approx(0.2)
    assert c.true_rate == pytest.approx(2 / 3)
    c = calibrate_threshold(same, diff, max_false_rate=0.0)
    assert c.threshold == pytest.approx(1.0) and c.false_rate == 0.0 and c.true_rate == 0.0
    # ties: five 0.5s and five 0.9s; allowing 3 false positives cannot admit the five 0.9s at t < 0.9
    tied = torch.tensor([0.5] * 5 + [0.9] * 5)
    c = calibrate_threshold(same, tied, max_false_rate=0.3)
    assert c.threshold == pytest.approx(0.9) and c.false_rate == 0.0
    # a distance (lower = more similar): the most permissive threshold is the highest one
    dist_same, dist_diff = torch.tensor([0.5, 3.0]), torch.arange(1.0, 11.0)
    c = calibrate_threshold(dist_same, dist_diff, 0.1, higher_is_more_similar=False)
    assert c.threshold == pytest.approx(2.0) and c.false_rate == pytest.approx(0.1) and c.true_rate == 0.5
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        calibrate_threshold(same, diff, max_false_rate=1.0)
