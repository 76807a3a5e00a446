"""Extraction attack: a constructed model that memorised known images, thresholds, resume, SSCD, OOM.

The known answer: `MemorizingVAR` is test-var (random weights) whose tokenizer maps chosen images onto
token sequences the transformer itself produces greedily from their first scales. Teacher forcing then
scores those images 1.0 on the last scale, greedy decoding from their prefix reproduces them token for
token, and every other image (random weights, nothing memorised) is not reproduced.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from iarmem_core import data, extraction, jobs, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.adapters.base import IARAdapter, UnitSite
from iarmem_core.adapters.var import VARAdapter
from iarmem_core.registry import ModelSpec
from iarmem_core.store import ResultStore

PREFIX = 14  # test-var scales (1, 2, 3, 4): the first three scales, 14 tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def _key(x_3HW: torch.Tensor) -> str:
    return hashlib.sha256(x_3HW.contiguous().numpy().tobytes()).hexdigest()


class MemorizingVAR(VARAdapter):
    """test-var whose tokenizer returns memorised token sequences for some images (see module docstring)."""

    memory: dict[str, list[torch.Tensor]]

    def memorize(self, images_B3HW: torch.Tensor, labels_B: torch.Tensor, prefix: int = PREFIX) -> None:
        toks = super().tokenize(images_B3HW)
        gen = self.generate(labels_B, prefix=toks, n_prefix=prefix)  # greedy, no CFG: what the attack does
        for b in range(images_B3HW.shape[0]):
            self.memory[_key(images_B3HW[b])] = [t[b] for t in gen]

    def tokenize(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        toks = super().tokenize(images_B3HW)
        for b in range(images_B3HW.shape[0]):
            mem = self.memory.get(_key(images_B3HW[b].cpu()))
            if mem is not None:
                for si, t in enumerate(toks):
                    t[b] = mem[si]
        return toks


@pytest.fixture(scope="module")
def world():
    """(model, training selection, held-out set, ids of the memorised images = the 32x planted ones)."""
    torch.set_num_threads(1)
    base = load_adapter("test-var", device="cpu")
    m = MemorizingVAR(
        base.spec, base.tokenizer, base.transformer, base.device, identity={**base.identity, "memorized": "32x"}
    )
    m.memory = {}
    train = data.select_demo(n=40, seed=0)
    mem = np.flatnonzero(train.meta["count"] == 32)
    m.memorize(train.images(mem, size=m.image_size), train.labels_tensor(mem))
    heldout = data.select_demo(n=20, seed=0, split="heldout")
    return m, train, heldout, {train.ids[i] for i in mem}


def _cfg(**kw) -> extraction.ExtractionConfig:
    return extraction.ExtractionConfig(**{"candidates_per_class": 2, "batch_size": 8, "prefix_tokens": (PREFIX,), **kw})


def test_memorised_images_are_extracted_and_held_out_images_are_not(world, tmp_path):
    m, train, heldout, mem_ids = world
    res = extraction.run_extraction(m, train, _cfg(), heldout_set=heldout, store=ResultStore(tmp_path))
    t = res.table
    # candidates: the memorised image of each class ranks first (teacher-forced last-scale accuracy 1.0)
    tr = t[t.split == "train"]
    assert len(tr) == 20 and mem_ids <= set(tr.image_id)
    assert (tr[tr.image_id.isin(mem_ids)]["score"] == 1.0).all()
    assert (tr[tr.image_id.isin(mem_ids)]["rank"] == 0).all()
    # decision: exactly the memorised ones, token for token; no held-out image
    assert set(tr[tr.extracted].image_id) == mem_ids
    assert (tr[tr.image_id.isin(mem_ids)]["token_match"] == 1.0).all()
    assert tr[~tr.image_id.isin(mem_ids)]["token_match"].max() < 0.9
    ho = t[t.split == "heldout"]
    assert len(ho) == 20 and not ho.extracted.any()
    c = res.count()
    assert c["extracted"] == 10 and c["candidates"] == 20
    assert c["precision_planted"] == 1.0 and c["recall_planted_max_count"] == 1.0 and c["max_count"] == 32
    assert c["recall_planted"] == pytest.approx(10 / 20)  # over every planted image of the selection
    assert c["heldout_false_rate"] == 0.0 and c["heldout_n"] == 20
    assert res.meta["similarity"] == "token_match" and "uncalibrated" in res.summary()["threshold_source"]
    # the gallery holds the reconstruction and the generation, identical for a memorised image
    row = int(np.flatnonzero((t.image_id == sorted(mem_ids)[0]).to_numpy())[0])
    assert res.generated_images.shape == (len(t), 8, 8, 3) and res.recon_images.dtype == np.uint8
    np.testing.assert_array_equal(res.generated_images[row], res.recon_images[row])


def test_decision_flips_with_the_threshold_without_recomputing(world, tmp_path):
    m, train, heldout, mem_ids = world
    st = ResultStore(tmp_path)
    res = extraction.run_extraction(m, train, _cfg(), heldout_set=heldout, store=st)
    assert res.count(threshold=0.999)["extracted"] == 10
    assert res.count(threshold=1.0)["extracted"] == 0  # strictly above: a perfect copy at 1.0 no longer counts
    tr = res.table[res.table.split == "train"]
    other = tr[~tr.image_id.isin(mem_ids)]
    top = other[other.token_match == other.token_match.max()]
    below = float(top.token_match.iloc[0]) - 1e-6  # just under the best non-memorised score: those join
    assert res.count(threshold=below)["extracted"] == 10 + len(top)
    # the other candidates include planted 8x images, which count as correct
    expected = (10 + int(top.planted.sum())) / (10 + len(top))
    assert res.count(threshold=below)["precision_planted"] == pytest.approx(expected)
    # another measure / threshold is a new view of the same stored table, and the store is not touched again
    again = extraction.run_extraction(m, train, _cfg(threshold=1.0), heldout_set=heldout, store=st)
    assert again.meta["store_key"] == res.meta["store_key"] and again.count()["extracted"] == 0
    assert again.summary()["threshold_source"] == "user"


def test_resume_after_interruption_equals_a_clean_run(world, tmp_path, monkeypatch):
    m, train, heldout, _ = world
    monkeypatch.setattr(jobs, "CHECKPOINT_EVERY_S", 0.0)
    cfg = _cfg(batch_size=4, prefix_tokens=(5, PREFIX))
    clean = extraction.run_extraction(m, train, cfg, heldout_set=heldout, store=ResultStore(tmp_path / "a"))

    st = ResultStore(tmp_path / "b")
    seen = []

    def interrupt(frac: float, msg: str) -> None:
        if msg.startswith("attacked"):
            seen.append(msg)
            if len(seen) == 4:
                raise KeyboardInterrupt  # what Ctrl-C does in the CLI: the checkpoint is kept

    with pytest.raises(KeyboardInterrupt):
        extraction.run_extraction(m, train, cfg, heldout_set=heldout, store=st, on_progress=interrupt)
    key = clean.meta["store_key"]
    assert st.has_partial(key) and not st.exists(key)
    partial = extraction.load_partial_extraction(st, key)
    assert partial is not None and 0 < len(partial.table) < len(clean.table)
    resumed = extraction.run_extraction(m, train, cfg, heldout_set=heldout, store=st)
    assert resumed.meta["timings"]["resumed_at_item"] > 0
    for k, v in clean.arrays.items():
        np.testing.assert_array_equal(resumed.arrays[k], v, err_msg=k)
    assert resumed.count(prefix=5) == clean.count(prefix=5)


def test_out_of_memory_halves_the_batch_and_says_so(world, tmp_path, monkeypatch):
    m, train, heldout, _ = world
    clean = extraction.run_extraction(
        m, train, _cfg(batch_size=2), heldout_set=heldout, store=ResultStore(tmp_path / "a")
    )
    real = MemorizingVAR.generate_latent  # what the attack calls (generate + VAR's final f_hat)

    def small_gpu(self, labels, *a, **kw):
        if len(labels) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, labels, *a, **kw)

    monkeypatch.setattr(MemorizingVAR, "generate_latent", small_gpu)
    res = extraction.run_extraction(
        m, train, _cfg(batch_size=8), heldout_set=heldout, store=ResultStore(tmp_path / "b")
    )
    assert [(e["from"], e["to"]) for e in res.meta["oom_events"]] == [(8, 4), (4, 2)]
    for k in ("sim_token_match", "gen_tokens_RN", "image_id"):
        np.testing.assert_array_equal(res.arrays[k], clean.arrays[k])

    def no_gpu(self, labels, *a, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(MemorizingVAR, "generate_latent", no_gpu)
    with pytest.raises(jobs.OutOfMemory, match="batch of 1 .*does not fit"):
        extraction.run_extraction(m, train, _cfg(batch_size=2), heldout_set=heldout, store=ResultStore(tmp_path / "c"))


def test_other_errors_are_not_mistaken_for_out_of_memory():
    calls = []

    def work(i, j):
        calls.append((i, j))
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        jobs.run_batches(None, 10, 4, work)
    assert calls == [(0, 4)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save: the format SSCD ships in
def test_sscd_from_a_torchscript_file(world, tmp_path):
    m, train, heldout, mem_ids = world

    class TinyEmbed(torch.nn.Module):  # stands in for sscd_disc_mixup: [B, 3, 320, 320] -> [B, 48]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.save(torch.jit.script(TinyEmbed()), str(path))
    cfg = _cfg(similarity="sscd")
    res = extraction.run_extraction(m, train, cfg, heldout_set=heldout, store=ResultStore(tmp_path), sscd_path=path)
    assert "sscd" in res.meta["measures"] and res.similarity == "sscd"
    c = res.count()
    assert c["similarity"] == "sscd" and c["threshold"] == 0.75 and "published" in res.summary()["threshold_source"]
    t = res.table
    assert (t[t.image_id.isin(mem_ids)]["sscd"] > 0.9999).all()  # identical images: cosine 1
    assert set(t[t.extracted & (t.split == "train")].image_id) >= mem_ids
    with pytest.raises(ValueError, match="sscd"):
        extraction.run_extraction(m, train, cfg, heldout_set=heldout, store=ResultStore(tmp_path))


def test_scores_reuse_a_stored_unitmem_pass(world, tmp_path):
    m, train, _, mem_ids = world
    st = ResultStore(tmp_path)
    sub = train.subset(np.arange(12))
    computed, meta = extraction.memorization_scores(m, sub, store=st)
    assert meta["source"].startswith("teacher-forced")
    unitmem.run_unitmem(m, sub, unitmem.UnitMemConfig(n_augs=2, batch_size=6), store=st)
    reused, meta2 = extraction.memorization_scores(m, sub, store=st)
    assert meta2["source"].startswith("correct_NT of UnitMem result unitmem-")
    np.testing.assert_allclose(reused, computed)
    s = extraction.per_image_scores(m, sub, store=st)
    np.testing.assert_allclose(s, computed[:, meta["groups"].index("4x4")])


class _Grid(IARAdapter):
    """Layout only: a next-token model with a 16x16 grid (256 tokens)."""

    family = "toy"
    token_grids = [(16, 16)]
    vocab_size = 8

    def __init__(self):
        spec = ModelSpec(name="grid", family="rar", image_size=16, num_classes=2, tokenizer={}, transformer={})
        super().__init__(spec, torch.nn.Identity(), torch.nn.Identity(), torch.device("cpu"))

    build_tokenizer = build_transformer = tokenize = decode = teacher_forced_logits = generate = None

    def unit_sites(self) -> list[UnitSite]:
        return []


def test_next_token_score_is_the_last_99_tokens_and_var_the_last_scale(world):
    g = _Grid()
    correct_NT = np.zeros((2, 256), np.uint8)
    correct_NT[0, -99:] = 1  # image 0: the last 99 right, everything before wrong
    correct_NT[1, :157] = 1  # image 1: the opposite
    acc = extraction.accuracies_from_correct(correct_NT, g)
    names = [n for n, _ in extraction.score_groups(g)]
    assert extraction.score_definition(g) == "last99"
    np.testing.assert_allclose(acc[:, names.index("last99")], [1.0, 0.0])
    np.testing.assert_allclose(acc[:, names.index("16x16")], [99 / 256, 157 / 256])
    assert extraction.default_prefix(g) == 30  # the paper's 30 of 256 tokens
    m = world[0]
    assert extraction.score_definition(m) == "4x4" and extraction.default_prefix(m) == 14  # 3 of 4 scales
    rar = load_adapter("test-rar", device="cpu")
    assert extraction.default_prefix(rar) == 4  # 30/256 of 36 tokens


def test_candidates_are_top_k_per_class_by_score():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(extraction.select_candidates(scores, labels, 2), [1, 2, 3, 5])
    np.testing.assert_array_equal(extraction.select_candidates(np.ones(4), np.zeros(4, int), 2), [0, 1])
    np.testing.assert_array_equal(extraction.class_ranks(scores, labels), [2, 0, 1, 0, 2, 1])
    labels_mixed = np.array([1, 0, 1, 0, 1, 0])  # classes interleaved: output grouped by class, best first
    np.testing.assert_array_equal(extraction.select_candidates(scores, labels_mixed, 1), [1, 2])


def test_config_names_and_prefixes(world):
    m = world[0]
    assert extraction.ExtractionConfig(similarity="feature-cosine").similarity == "feature_cosine"
    with pytest.raises(ValueError, match="unknown similarity"):
        extraction.ExtractionConfig(similarity="lpips")
    with pytest.raises(ValueError, match="whole scales"):
        extraction.resolve_prefixes(m, extraction.ExtractionConfig(prefix_tokens=(7,)))
    assert extraction.resolve_prefixes(m, extraction.ExtractionConfig(prefix_tokens=(5, 1, 5))) == [5, 1]


def test_edit_is_part_of_the_key_and_applies_to_generation_only(world, tmp_path):
    from iarmem_core.hooks import UnitEdit

    m, train, heldout, mem_ids = world
    st = ResultStore(tmp_path)
    before = extraction.run_extraction(m, train, _cfg(), heldout_set=heldout, store=st)
    units = {b: tuple(range(m.n_units)) for b in range(m.n_blocks)}
    after = extraction.run_extraction(m, train, _cfg(), heldout_set=heldout, store=st, edit=UnitEdit(units, op="zero"))
    assert after.meta["store_key"] != before.meta["store_key"]
    np.testing.assert_array_equal(after.arrays["score"], before.arrays["score"])  # same candidates
    assert after.count()["extracted"] < before.count()["extracted"]
    again = extraction.run_extraction(m, train, _cfg(), heldout_set=heldout, store=st, force=True)
    np.testing.assert_array_equal(again.arrays["gen_tokens_RN"], before.arrays["gen_tokens_RN"])  # undone


def test_calibration_sets_the_threshold_from_held_out_false_positives(world, tmp_path):
    m, train, heldout, mem_ids = world
    st = ResultStore(tmp_path)
    planted = train.subset([train.ids.index(i) for i in sorted(mem_ids)])
    cal = extraction.calibrate(m, heldout, _cfg(), store=st, max_false_rate=0.0, planted_set=planted)
    neg = extraction.run_extraction(m, heldout, _cfg(candidate_ids=tuple(heldout.ids), heldout=False), store=st)
    t = cal["thresholds"]["token_match"][str(PREFIX)]
    assert t == pytest.approx(float(neg.arrays["sim_token_match"].max()))  # no held-out image above it
    assert cal["table"][0]["true_rate"] == 1.0 and cal["measure"] == "token_match"
    res = extraction.run_extraction(m, train, _cfg(), heldout_set=heldout, store=st)
    assert res.count()["threshold"] == pytest.approx(t) and res.summary()["threshold_source"].startswith("calibrated")


@pytest.mark.parametrize("name", ["demo-var", "demo-rar"])
def test_the_cards_calibration_is_for_the_shipped_weights_and_meets_the_demo_targets(name):
    """The world's targets on the shipped demo models, with the defaults a user gets (the app's and the CLI's
    attack, as shipped in assets/store): recall >= 0.9 on the 32x items, precision >= 0.9 on the planted items,
    held-out false rate <= 0.02, at the threshold of the model card."""
    from iarmem_app import config

    m = load_adapter(name)
    cal = extraction.card_calibration(name, m.identity)
    assert cal is not None, "the card has no calibration for these weights: run `train-demo --only calibrate`"
    st = ResultStore(config.SHIPPED_STORE, read_only=True)
    key = extraction.extraction_key(m, data.select_demo(n=500, seed=0), extraction.ExtractionConfig(seed=0), store=st)
    assert st.exists(key), "assets/store is stale: run scripts/precompute_demo_results.py"
    res = extraction.load_extraction(st, key)
    c = res.count()
    assert res.summary()["threshold_source"].startswith("calibration in the model card"), res.summary()
    assert c["recall_planted_by_count"]["32"] >= 0.9, c
    assert c["precision_planted"] >= 0.9, c
    assert c["heldout_n"] == 200 and c["heldout_false_rate"] <= 0.02, c


def test_one_decision_at_tied_thresholds():
    """A score equal to the threshold is not extracted, in the counts and in every label (float32 compare)."""
    # token match in steps of 1/100: 91/100 stored in float32 is 0.91000000238 > the float64 0.91
    scores = (np.array([89, 90, 91, 91, 92, 95]) / 100).astype(np.float32)
    assert (scores[2].astype(np.float64) > 0.91) and not extraction.is_extracted(scores[2], 0.91)
    np.testing.assert_array_equal(extraction.is_extracted(scores, 0.91), [False, False, False, False, True, True])
    np.testing.assert_array_equal(extraction.is_extracted(scores, 0.905), [False, False, True, True, True, True])
    # per-row thresholds broadcast
    np.testing.assert_array_equal(
        extraction.is_extracted(scores, np.full(6, 0.90)), [False, False, True, True, True, True]
    )
    # a result's count and its table's labels agree at a tied threshold
    arrays = {
        "image_id": np.array([f"train/{i}" for i in range(6)]),
        "label": np.zeros(6, np.int64),
        "score": np.zeros(6, np.float32),
        "prefix_tokens": np.full(6, 8),
        "split": np.array(["train"] * 6),
        "rank": np.arange(6),
        "item": np.arange(6),
        "planted": np.full(6, -1, np.int8),
        "count": np.full(6, -1, np.int64),
        "sim_token_match": scores,
    }
    meta = {
        "measures": ["token_match"],
        "similarity": "token_match",
        "prefix_tokens": [8],
        "thresholds": [{"measure": "token_match", "prefix_tokens": 8, "threshold": 0.91, "source": "user"}],
    }
    res = extraction.ExtractionResult(arrays, meta)
    assert res.count()["extracted"] == 2 == int(res.table["extracted"].sum())
    assert res.count(threshold=0.91)["extracted"] == 2 == int(res.decision(0.91).sum())
    assert res.count(threshold=0.90)["extracted"] == 4
