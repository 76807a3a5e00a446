"""The training-data extraction attack (METHOD.md sections 3 and 4, the protocol of Kowalczuk et al.).

1. Score every image of the data selection: teacher-forced top-1 accuracy (true class, no CFG). VAR ranks
   by the last scale's accuracy, next-token models by the last 99 tokens (all when fewer). A stored UnitMem
   pass of the same model and data already holds the per-token correctness (`correct_NT`) and is reused;
   otherwise a cheap batched teacher-forced pass runs as its own job (kind ``memscore``).
2. Candidates: the top `candidates_per_class` images of each class by that score, or explicit image ids.
3. For each candidate and each prefix length P: the first P true tokens (VAR: whole scales) and the class
   label; the rest is decoded greedily (default), class-conditional, without CFG, with the KV cache, in
   batches of candidates. An optional `hooks.UnitEdit` is applied to the generation only (the candidates
   stay those of the unedited model, so "before" and "after" attack the same images).
4. The generated tokens are decoded and compared with the tokenizer's reconstruction of the candidate. The
   candidates' tokens, reconstructions and the reconstructions' features are computed once and kept in the
   store (`cache`: kinds ``tokens`` and ``reference``), shared by scoring and by every run over the same
   candidates (before/after an edit, random draws, sweep points, prefixes); the result is bit-identical to
   computing them in each batch (`run_extraction(..., cache=False)`). VAR decodes its generation's final
   f_hat. ``ExtractionConfig(decode_dtype="bf16")`` decodes the compared images in bf16 (token ids and
   teacher forcing stay fp32) and rescores rows near a threshold from fp32 decodes, so decisions stay fp32's.
5. Every available similarity is kept per row; one of them (with its threshold) makes the decision:

   - ``sscd``: cosine of SSCD ``sscd_disc_mixup`` embeddings from the user's TorchScript file, threshold
     0.75 (published).
   - ``token_match``: fraction of generated tokens (after the prefix) equal to the candidate's true tokens.
   - ``ssim``: SSIM of generated vs reconstructed image (only for images of at least 11 px).
   - ``feature_cosine``: cosine in the bundled demo feature space (``demo-fashion-cnn``); computed for demo
     and test models only (a Fashion-MNIST CNN says nothing about ImageNet images).

   ``similarity="auto"`` is SSCD when its file is given, else the model's calibrated offline measure, else
   token_match.

Threshold calibration of the offline measures (`calibrate`): the attack is run on *held-out* images the
model never saw, at the same prefixes; the threshold of each (measure, prefix) is the lowest value that at
most ``max_false_rate`` of those held-out generations exceed (`metrics.calibrate_threshold`). The default,
``max_false_rate=0``, is the highest similarity any calibration image reached: for a new held-out image the
chance to exceed the maximum of n exchangeable ones is 1/(n+1) (0.12% for the demo's 800). A 1% quantile
proved too permissive on demo-rar: it let in unique training images reproduced only half-way (token match
0.46-0.52, SSIM 0.72-0.90; copies score >= 0.58 and > 0.95). On the demo the calibration images are the
held-out images *not* in the evaluation held-out sample (the two are disjoint, `demo_heldout_sets`), so the
reported held-out false rate is measured on other images than the threshold was set on. Thresholds depend
on the model and the prefix; every result records, per measure and prefix, the threshold and where it came
from (user, published, calibrated with the store key of the calibration, the calibration in the model card of
the demo models, or an uncalibrated default).

The decision is never baked into the stored result: the table keeps the scores, and
`ExtractionResult.count(threshold, similarity)` recounts instantly (the app's threshold slider).

Modules: `config` (ExtractionConfig, prefixes), `scores` (step 1-2), `attack` (steps 3-4 and the job),
`cache` (stored tokens and references), `measures` (step 5: which similarities, their scores), `thresholds`
(per model and prefix), `result` (ExtractionResult, recounts), `calibration` (thresholds on held-out images).

Example:
    >>> from iarmem_core import data, extraction
    >>> from iarmem_core.adapters import load_adapter
    >>> m = load_adapter("demo-var")
    >>> res = extraction.run_extraction(m, data.select_demo(500), extraction.ExtractionConfig())
    >>> res.count()["extracted"], res.count(threshold=0.99)["extracted"]
"""

from iarmem_core.extraction.attack import (
    attack_batch,
    extraction_key,
    job_spec,
    run_extraction,
    start_extraction,
)
from iarmem_core.extraction.calibration import calibrate
from iarmem_core.extraction.config import (
    CALIBRATION_KIND,
    DEFAULT_MAX_FALSE_RATE,
    KIND,
    MEASURES,
    MIN_SSIM_SIZE,
    SCORE_KIND,
    SSCD_THRESHOLD,
    TAIL_TOKENS,
    VERSION,
    ExtractionConfig,
    default_prefix,
    demo_heldout_sets,
    resolve_prefixes,
)
from iarmem_core.extraction.measures import available_measures, compute_similarities
from iarmem_core.extraction.result import (
    ExtractionResult,
    finalize,
    is_extracted,
    load_extraction,
    load_partial_extraction,
)
from iarmem_core.extraction.scores import (
    accuracies_from_correct,
    class_ranks,
    find_unitmem,
    memorization_scores,
    per_image_scores,
    score_definition,
    score_groups,
    select_candidates,
)
from iarmem_core.extraction.thresholds import (
    card_calibration,
    find_calibration,
    resolve_similarity,
    resolve_thresholds,
)

__all__ = [
    "CALIBRATION_KIND",
    "DEFAULT_MAX_FALSE_RATE",
    "card_calibration",
    "KIND",
    "MEASURES",
    "MIN_SSIM_SIZE",
    "SCORE_KIND",
    "SSCD_THRESHOLD",
    "TAIL_TOKENS",
    "VERSION",
    "ExtractionConfig",
    "ExtractionResult",
    "accuracies_from_correct",
    "attack_batch",
    "available_measures",
    "calibrate",
    "class_ranks",
    "compute_similarities",
    "default_prefix",
    "demo_heldout_sets",
    "extraction_key",
    "finalize",
    "find_calibration",
    "find_unitmem",
    "is_extracted",
    "job_spec",
    "load_extraction",
    "load_partial_extraction",
    "memorization_scores",
    "per_image_scores",
    "resolve_prefixes",
    "resolve_similarity",
    "resolve_thresholds",
    "run_extraction",
    "score_definition",
    "score_groups",
    "select_candidates",
    "start_extraction",
]
