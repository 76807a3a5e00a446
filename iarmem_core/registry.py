"""Named model configs: every released VAR / RAR / LlamaGen model, the bundled demos and tiny test configs.

A spec holds the constructor keyword arguments of our tokenizer and transformer classes, which use the
official argument names (so the golden `config.json` files and the official checkpoints map onto them
directly), plus the official checkpoint file names and the published sampling settings.

Example:
    >>> from iarmem_core.registry import get_spec
    >>> get_spec("var-d16").transformer["depth"]
    16
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("var", "rar", "llamagen")
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # one of FAMILIES
    image_size: int
    num_classes: int
    tokenizer: dict  # constructor kwargs of the family's tokenizer class
    transformer: dict  # constructor kwargs of the family's transformer class
    files: dict = field(default_factory=dict)  # official file names: {"tokenizer": ..., "transformer": ...}
    sampling: dict = field(default_factory=dict)  # published sampling settings (METHOD.md section 7)
    published: dict = field(default_factory=dict)  # published numbers (params, FID, extraction counts)
    bundled: dict = field(default_factory=dict)  # paths under assets/ of shipped weights (demo models)
    description: str = ""
    kind: str = "released"  # "released", "demo" or "test"
    # The augmentation UnitMem uses by default (METHOD.md: "the model's training augmentation"; the
    # papers do not state it exactly). VAR trains on a random crop of a 1.125x resize; for the
    # next-token families iarmem assumes crop + horizontal flip. Names are those of data.augment.
    train_augmentation: str = "crop"
    # demo models: the splits of the demo bundle they were trained on (the rest is never-trained for them)
    trained_splits: tuple[str, ...] = ("train",)

    @property
    def card_path(self) -> Path | None:
        """assets/<name>/card.json of a bundled model (None for others)."""
        t = self.bundled.get("transformer")
        return (ASSETS.parent / t).parent / "card.json" if t else None

    @property
    def depth(self) -> int:
        t = self.transformer
        return int(t.get("depth", t.get("num_hidden_layers", t.get("n_layer", 0))))

    @property
    def width(self) -> int:
        t = self.transformer
        return int(t.get("embed_dim", t.get("hidden_size", t.get("dim", 0))))


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown family {spec.family!r}")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """The spec registered under `name`; a clear error with the closest names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"no model named {name!r} in the registry.{hint} Known: {', '.join(list_models())}") from None


def list_models(family: str | None = None, kind: str | None = None) -> list[str]:
    return [
        n for n, s in _REGISTRY.items() if (family is None or s.family == family) and (kind is None or s.kind == kind)
    ]


def all_specs() -> list[ModelSpec]:
    return list(_REGISTRY.values())


# ---------------------------------------------------------------------------------------------------
# 1. VAR (FoundationVision/VAR). build_vae_var's rule: width = 64 * depth, heads = depth, mlp_ratio 4.
VAR_PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _var_vae(patch_nums: tuple[int, ...]) -> dict:
    # vae_ch160v4096z32.pth; the official VQVAE hard-codes ch_mult (1,1,2,2,4) (downsample 16)
    return dict(
        vocab_size=4096,
        z_channels=32,
        ch=160,
        ch_mult=(1, 1, 2, 2, 4),
        share_quant_resi=4,
        quant_resi=0.5,
        v_patch_nums=patch_nums,
        using_znorm=False,
        quant_conv_ks=3,
    )


def _var(depth: int, patch_nums: tuple[int, ...] = VAR_PN_256, shared_aln: bool = False) -> dict:
    return dict(
        num_classes=1000,
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        mlp_ratio=4.0,
        norm_eps=1e-6,
        shared_aln=shared_aln,
        attn_l2_norm=True,
        patch_nums=patch_nums,
        cond_drop_rate=0.1,
    )


_VAR_PARAMS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356, 36: 2_353_893_904}
_VAR_FID = {16: 3.55, 20: 2.95, 24: 2.33, 30: 1.97, 36: None}
# published extraction numbers (Kowalczuk et al.; the localization paper's baseline and its top-10% edit)
_VAR_EXTRA = {
    30: {
        "extracted_of_5000": 698,
        "extracted_localization_paper": 672,
        "extracted_after_top10_edit": 110,
        "fid_after_top10_edit": 2.58,
    }
}
for _d in (16, 20, 24, 30):
    register(
        ModelSpec(
            name=f"var-d{_d}",
            family="var",
            image_size=256,
            num_classes=1000,
            tokenizer=_var_vae(VAR_PN_256),
            transformer=_var(_d),
            files={"tokenizer": "vae_ch160v4096z32.pth", "transformer": f"var_d{_d}.pth"},
            sampling={"cfg": 1.5, "top_k": 900, "top_p": 0.96},
            published={"params": _VAR_PARAMS[_d], "fid": _VAR_FID[_d], **_VAR_EXTRA.get(_d, {})},
            description=f"VAR-d{_d}, 256 px, 10 scales (680 tokens), ImageNet class-conditional",
        )
    )
register(
    ModelSpec(
        name="var-d36",
        family="var",
        image_size=512,
        num_classes=1000,
        tokenizer=_var_vae(VAR_PN_512),
        transformer=_var(36, VAR_PN_512, shared_aln=True),
        files={"tokenizer": "vae_ch160v4096z32.pth", "transformer": "var_d36.pth"},
        sampling={"cfg": 1.5, "top_k": 900, "top_p": 0.96},
        published={"params": _VAR_PARAMS[36]},
        description="VAR-d36, 512 px, shared AdaLN, 10 scales (2240 tokens), ImageNet class-conditional",
    )
)

# The tiny config of ../shared/golden/var (ch_mult override, width 64, 2 heads), 8x8 images.
register(
    ModelSpec(
        name="test-var",
        family="var",
        image_size=8,
        num_classes=10,
        kind="test",
        tokenizer=dict(
            vocab_size=128,
            z_channels=8,
            ch=32,
            ch_mult=(1, 2),
            share_quant_resi=4,
            quant_resi=0.5,
            v_patch_nums=(1, 2, 3, 4),
            using_znorm=False,
            quant_conv_ks=3,
        ),
        transformer=dict(
            num_classes=10,
            depth=2,
            embed_dim=64,
            num_heads=2,
            mlp_ratio=4.0,
            norm_eps=1e-6,
            shared_aln=False,
            attn_l2_norm=True,
            patch_nums=(1, 2, 3, 4),
            cond_drop_rate=0.1,
        ),
        description="tiny VAR of the golden data (random weights unless a state dict is given)",
    )
)
register(
    ModelSpec(
        name="test-var-shared-aln",
        family="var",
        image_size=8,
        num_classes=10,
        kind="test",
        tokenizer=dict(
            vocab_size=128,
            z_channels=8,
            ch=32,
            ch_mult=(1, 2),
            share_quant_resi=4,
            quant_resi=0.5,
            v_patch_nums=(1, 2, 3, 4),
            using_znorm=False,
            quant_conv_ks=3,
        ),
        transformer=dict(
            num_classes=10,
            depth=3,
            embed_dim=64,
            num_heads=2,
            mlp_ratio=4.0,
            norm_eps=1e-6,
            shared_aln=True,
            attn_l2_norm=True,
            patch_nums=(1, 2, 3, 4),
            cond_drop_rate=0.1,
        ),
        description="tiny VAR with shared AdaLN (the d36 variant)",
    )
)

# ---------------------------------------------------------------------------------------------------
# 2. RAR (bytedance/1d-tokenizer) with the MaskGIT-VQGAN tokenizer; 16 heads for every released size.
_MASKGIT_256 = dict(
    channel_mult=(1, 1, 2, 2, 4),
    num_resolutions=5,
    dropout=0.0,
    hidden_channels=128,
    num_channels=3,
    num_res_blocks=2,
    resolution=256,
    z_channels=256,
    num_embeddings=1024,
    embedding_dim=256,
)
_RAR = {  # hidden, layers, intermediate, params, (temperature, guidance, power), FID
    "b": (768, 24, 3072, 260_923_648, (1.0, 16.0, 2.75), 1.95),
    "l": (1024, 24, 4096, 461_668_352, (1.02, 15.5, 2.5), 1.70),
    "xl": (1280, 32, 5120, 955_425_024, (1.02, 6.9, 1.5), 1.50),
    "xxl": (1408, 40, 6144, 1_498_520_704, (1.02, 8.0, 1.2), 1.48),
}
_RAR_EXTRA = {
    "xxl": {
        "extracted_of_5000": 36,
        "extracted_localization_paper": 75,
        "extracted_after_top5_edit": 26,
        "extracted_after_top10_edit": 13,
        "extracted_after_top1_edit": 68,
        "fid_after_top5_edit": 5.12,
        "fid_after_top10_edit": 7.3,
        "fid_after_top1_edit": 3.21,
    }
}
for _s, (_h, _n, _i, _p, (_t, _g, _pow), _fid) in _RAR.items():
    register(
        ModelSpec(
            name=f"rar-{_s}",
            family="rar",
            image_size=256,
            num_classes=1000,
            tokenizer=dict(_MASKGIT_256),
            transformer=dict(
                hidden_size=_h,
                num_hidden_layers=_n,
                num_attention_heads=16,
                intermediate_size=_i,
                image_seq_len=256,
                condition_num_classes=1000,
                codebook_size=1024,
                dropout=0.1,
                attn_drop=0.1,
            ),
            files={"tokenizer": "maskgit-vqgan-imagenet-f16-256.bin", "transformer": f"rar_{_s}.bin"},
            sampling={"temperature": _t, "cfg": _g, "cfg_power": _pow},
            published={"params": _p, "fid": _fid, **_RAR_EXTRA.get(_s, {})},
            description=f"RAR-{_s.upper()}, 256 px, 16x16 raster tokens, ImageNet class-conditional",
            train_augmentation="crop+flip",
        )
    )
register(
    ModelSpec(
        name="test-rar",
        family="rar",
        image_size=12,
        num_classes=10,
        kind="test",
        tokenizer=dict(
            channel_mult=(1, 2),
            num_resolutions=2,
            dropout=0.0,
            hidden_channels=32,
            num_channels=3,
            num_res_blocks=2,
            resolution=12,
            z_channels=16,
            num_embeddings=128,
            embedding_dim=16,
        ),
        transformer=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            image_seq_len=36,
            condition_num_classes=10,
            codebook_size=128,
            dropout=0.1,
            attn_drop=0.1,
        ),
        sampling={"temperature": 1.0, "cfg": 16.0, "cfg_power": 2.75},
        description="tiny RAR of the golden data",
    )
)

# ---------------------------------------------------------------------------------------------------
# 3. LlamaGen c2i (FoundationVision/LlamaGen) with VQ-16.
_VQ16 = dict(
    codebook_size=16384,
    codebook_embed_dim=8,
    codebook_l2_norm=True,
    codebook_show_usage=True,
    commit_loss_beta=0.25,
    entropy_loss_ratio=0.0,
    encoder_ch_mult=(1, 1, 2, 2, 4),
    decoder_ch_mult=(1, 1, 2, 2, 4),
    z_channels=256,
    dropout_p=0.0,
    ch=128,
)
_GPT = {  # n_layer, n_head, dim, params, files
    "b": (12, 12, 768, 110_888_448, (256, 384)),
    "l": (24, 16, 1024, 342_910_976, (256, 384)),
    "xl": (36, 20, 1280, 774_699_520, (384,)),
    "xxl": (48, 24, 1536, 1_410_972_672, (384,)),
    "3b": (24, 32, 3200, 3_096_659_200, (384,)),
}
_GPT_CFG = {"b": 2.0, "l": 2.0, "xl": 1.75, "xxl": 1.75, "3b": 1.65}
for _s, (_nl, _nh, _dim, _p, _sizes) in _GPT.items():
    for _px in _sizes:
        _grid = _px // 16
        register(
            ModelSpec(
                name=f"llamagen-{_s}-{_px}",
                family="llamagen",
                image_size=_px,
                num_classes=1000,
                tokenizer=dict(_VQ16),
                transformer=dict(
                    dim=_dim,
                    n_layer=_nl,
                    n_head=_nh,
                    n_kv_head=None,
                    multiple_of=256,
                    ffn_dim_multiplier=None,
                    rope_base=10000,
                    norm_eps=1e-5,
                    num_classes=1000,
                    class_dropout_prob=0.1,
                    vocab_size=16384,
                    cls_token_num=1,
                    block_size=_grid * _grid,
                    model_type="c2i",
                ),
                files={
                    "tokenizer": "vq_ds16_c2i.pt",
                    "transformer": f"c2i_{_s.upper() if _s != '3b' else '3B'}_{_px}.pt",
                },
                sampling={"cfg": _GPT_CFG[_s], "top_k": 0, "top_p": 1.0, "temperature": 1.0},
                published={"params": _p},
                description=f"LlamaGen GPT-{_s.upper()} c2i, {_px} px, {_grid}x{_grid} raster tokens",
                train_augmentation="crop+flip",
            )
        )
register(
    ModelSpec(
        name="test-llamagen",
        family="llamagen",
        image_size=12,
        num_classes=10,
        kind="test",
        tokenizer=dict(
            codebook_size=128,
            codebook_embed_dim=8,
            codebook_l2_norm=True,
            codebook_show_usage=True,
            commit_loss_beta=0.25,
            entropy_loss_ratio=0.0,
            encoder_ch_mult=(1, 2),
            decoder_ch_mult=(1, 2),
            z_channels=32,
            dropout_p=0.0,
            ch=32,
        ),
        transformer=dict(
            dim=64,
            n_layer=2,
            n_head=4,
            n_kv_head=None,
            multiple_of=256,
            ffn_dim_multiplier=None,
            rope_base=10000,
            norm_eps=1e-5,
            num_classes=10,
            class_dropout_prob=0.1,
            vocab_size=128,
            cls_token_num=1,
            block_size=36,
            model_type="c2i",
        ),
        sampling={"cfg": 4.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0},
        description="tiny LlamaGen of the golden data",
    )
)

# ---------------------------------------------------------------------------------------------------
# 4. The demo world (v2): small models of the real architectures trained on the bundled Fashion-MNIST subset with
# planted items of known kind and dose (assets/demo_data), by `python -m iarmem_core train-demo`
# (iarmem_core/demo/train.py). 32x32 images, 8x8 token grids, 8 blocks of width 96 (384 units each, 3072 units):
# small enough for a CPU laptop, deep enough for the early-vs-deep question. demo-var-ctl is the positive
# control: demo-var with the control canaries trained into designated units only (its card lists them).
# Sampling settings were chosen on the trained models for class accuracy and Frechet distance in the bundled
# feature space (see the model cards in assets/demo-*/).
DEMO_PATCH_NUMS = (1, 2, 3, 4, 6, 8)
_DEMO_VAR_TOKENIZER = dict(
    vocab_size=512,
    z_channels=32,
    ch=32,
    ch_mult=(1, 1, 2),
    num_res_blocks=1,
    share_quant_resi=4,
    quant_resi=0.5,
    v_patch_nums=DEMO_PATCH_NUMS,
    using_znorm=False,
    quant_conv_ks=3,
)
_DEMO_VAR_TRANSFORMER = dict(
    num_classes=10,
    depth=8,
    embed_dim=96,
    num_heads=4,
    mlp_ratio=4.0,
    norm_eps=1e-6,
    shared_aln=False,
    attn_l2_norm=True,
    patch_nums=DEMO_PATCH_NUMS,
    cond_drop_rate=0.1,
)
_DEMO_WORLD = "planted natural, mislabeled and out-of-distribution items at 8x and 32x per epoch"
register(
    ModelSpec(
        name="demo-var",
        family="var",
        image_size=32,
        num_classes=10,
        kind="demo",
        tokenizer=_DEMO_VAR_TOKENIZER,
        transformer=_DEMO_VAR_TRANSFORMER,
        bundled={
            "tokenizer": "assets/demo-var/tokenizer.safetensors",
            "transformer": "assets/demo-var/transformer.safetensors",
        },
        sampling={"cfg": 3.0, "top_k": 0, "top_p": 0.8, "temperature": 1.0},
        description=f"demo VAR: Fashion-MNIST 32 px, scales 1,2,3,4,6,8 (130 tokens), 8 blocks x 384 units, "
        f"{_DEMO_WORLD}",
        train_augmentation="flip",
    )
)
register(
    ModelSpec(
        name="demo-var-ctl",
        family="var",
        image_size=32,
        num_classes=10,
        kind="demo",
        tokenizer=_DEMO_VAR_TOKENIZER,
        transformer=_DEMO_VAR_TRANSFORMER,
        bundled={
            "tokenizer": "assets/demo-var/tokenizer.safetensors",
            "transformer": "assets/demo-var-ctl/transformer.safetensors",
        },
        sampling={"cfg": 3.0, "top_k": 0, "top_p": 0.8, "temperature": 1.0},
        description="positive control: demo-var with 20 block canaries trained into designated units only "
        "(memorization localized by construction; its card lists the units)",
        train_augmentation="flip",
        trained_splits=("train", "control"),
    )
)
register(
    ModelSpec(
        name="demo-rar",
        family="rar",
        image_size=32,
        num_classes=10,
        kind="demo",
        tokenizer=dict(
            channel_mult=(1, 1, 2),
            num_resolutions=3,
            dropout=0.0,
            hidden_channels=32,
            num_channels=3,
            num_res_blocks=1,
            resolution=32,
            z_channels=32,
            num_embeddings=512,
            embedding_dim=32,
        ),
        transformer=dict(
            hidden_size=96,
            num_hidden_layers=8,
            num_attention_heads=4,
            intermediate_size=384,
            image_seq_len=64,
            condition_num_classes=10,
            codebook_size=512,
            dropout=0.0,
            attn_drop=0.0,
            class_label_dropout=0.1,
        ),
        bundled={
            "tokenizer": "assets/demo-rar/tokenizer.safetensors",
            "transformer": "assets/demo-rar/transformer.safetensors",
        },
        sampling={"temperature": 1.0, "cfg": 5.0, "cfg_power": 1.0, "top_k": 0, "top_p": 0.95},
        description=f"demo RAR: Fashion-MNIST 32 px, 8x8 raster tokens, 8 blocks x 384 units, {_DEMO_WORLD}",
        train_augmentation="flip",
    )
)
