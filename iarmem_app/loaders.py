"""Cached loading of models and data for every browser session.

A model is loaded once per (name, checkpoint files, device, seed) and shared by all sessions. It holds no
per-session state: edits and captures are `with` blocks from iarmem_core.hooks that live in the calling
thread only. Typed paths must resolve inside the allowed roots; every failure becomes an st.error naming the
file and the fix, never a traceback.

What a link can make the server do is bounded: the demo and test models are small and load at once; a
full-size ("released") model that is not loaded yet loads only after a click in this browser session on a
button that states its size and memory (`NeedsConfirmation`), whatever the URL says; an unknown model name
loads nothing. Loaded models stay cached while their parameters fit the memory budget
(`config.model_memory_budget()`, $IARMEM_APP_MODEL_MEMORY_GB); the least recently used ones are dropped to
make room, and a model larger than the whole budget is refused with a message that says how to raise it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

from iarmem_app import config, state
from iarmem_core import data
from iarmem_core.adapters import IARAdapter, adapter_class, load_adapter, resolve_device
from iarmem_core.checkpoints import CheckpointError
from iarmem_core.cli.commands import DataArgs, ModelArgs
from iarmem_core.registry import get_spec

log = logging.getLogger("iarmem.app")


class UserInputError(Exception):
    """A problem with what the user typed or chose; its message says what to do."""


class NeedsChoice(UserInputError):
    """Nothing to show until the user chooses something in the sidebar (not an error)."""


class NeedsConfirmation(UserInputError):
    """A full-size model that is not loaded yet: it loads only after a click in this session."""

    def __init__(self, message: str, choice: ModelChoice):
        super().__init__(message)
        self.choice = choice


@dataclass(frozen=True)
class ModelChoice:
    name: str
    checkpoint: str | None
    tokenizer_checkpoint: str | None
    device: str
    seed: int

    def args(self) -> ModelArgs:
        """The CLI's model options for this choice (iarmem_core.cli.commands builds the command lines)."""
        return ModelArgs(self.name, self.checkpoint, self.tokenizer_checkpoint, self.device, self.seed)


def _checked_path(raw: str, what: str) -> str | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        p = data.resolve_inside(raw, config.allowed_roots())
    except data.PathNotAllowedError as e:
        raise UserInputError(f"{what}: {e} (the allowed roots come from IARMEM_ALLOWED_ROOTS)") from None
    if not p.exists():
        raise UserInputError(f"{what}: {raw} does not exist (resolved to {p}). Check the path and try again.")
    if what != "data folder" and not p.is_file():
        raise UserInputError(
            f"{what}: {raw} is a folder; give the weights file itself (.pth, .pt, .bin, .safetensors)."
        )
    return str(p)


def model_choice() -> ModelChoice:
    """The sidebar's model settings, with the typed paths checked."""
    name = state.model_name()
    if not name:
        raise NeedsChoice(
            "Choose a registry model in the sidebar (Model: another registry model). Full-size models need "
            "their official checkpoints; without them their weights are random."
        )
    ckpt = tok = None
    if state.get("model") == "other":
        ckpt = _checked_path(state.get("ckpt"), "transformer checkpoint")
        tok = _checked_path(state.get("tok_ckpt"), "tokenizer checkpoint")
    device = state.get("device")
    try:
        resolve_device(device)
    except RuntimeError as e:
        raise UserInputError(str(e)) from None
    return ModelChoice(name, ckpt, tok, device, int(state.get("seed")))


@functools.lru_cache(maxsize=64)
def model_size(name: str) -> tuple[int, int]:
    """(parameters, bytes as float32 incl. buffers) of registry model `name`, from a build on the meta
    device: nothing is allocated, so a 3 B model is sized in a fraction of a second."""
    spec = get_spec(name)
    cls = adapter_class(spec.family)
    with torch.device("meta"):
        mods = [cls.build_tokenizer(spec), cls.build_transformer(spec)]
    n = sum(p.numel() for m in mods for p in m.parameters())
    b = sum(t.numel() * 4 for m in mods for t in [*m.parameters(), *m.buffers()])
    return int(n), int(b)


def _adapter_bytes(adapter: IARAdapter) -> int:
    mods = (adapter.tokenizer, adapter.transformer)
    return int(sum(t.numel() * t.element_size() for m in mods for t in [*m.parameters(), *m.buffers()]))


_MODELS: OrderedDict[ModelChoice, tuple[IARAdapter, int]] = OrderedDict()  # least recently used first
_MODELS_MU = threading.Lock()
_LOADING: dict[ModelChoice, threading.Lock] = {}


def _evict_to(limit: int) -> None:
    """Drop the least recently used models until the cached ones take at most `limit` bytes (lock held)."""
    while _MODELS and sum(b for _, b in _MODELS.values()) > limit:
        old, (_, b) = _MODELS.popitem(last=False)
        log.info("model cache: dropped %s (%.2f GB) to stay within the memory budget", old.name, b / 1e9)


def cached_models() -> list[tuple[ModelChoice, int]]:
    """The loaded models and their bytes, least recently used first."""
    with _MODELS_MU:
        return [(c, b) for c, (_, b) in _MODELS.items()]


def is_loaded(choice: ModelChoice) -> bool:
    with _MODELS_MU:
        return choice in _MODELS


def clear_models() -> None:
    """Forget every cached model (tests; a later request loads again)."""
    with _MODELS_MU:
        _MODELS.clear()


def _load_model(choice: ModelChoice) -> IARAdapter:
    """The shared model of `choice`: from the cache, or loaded once (concurrent sessions wait for that load)."""
    with _MODELS_MU:
        hit = _MODELS.get(choice)
        if hit is not None:
            _MODELS.move_to_end(choice)
            return hit[0]
        mu = _LOADING.setdefault(choice, threading.Lock())
    with mu:
        with _MODELS_MU:
            hit = _MODELS.get(choice)
            if hit is not None:
                _MODELS.move_to_end(choice)
                return hit[0]
        budget = config.model_memory_budget()
        _, need = model_size(choice.name)
        if need > budget:
            raise UserInputError(
                f"{choice.name} needs about {need / 1e9:.1f} GB of memory, more than the app's model memory budget "
                f"of {budget / 1e9:.1f} GB. Start the app with {config.MODEL_MEMORY_ENV}=<GB> set higher (the "
                f"machine must have that much free memory), or use the CLI."
            )
        with _MODELS_MU:
            _evict_to(budget - need)  # room first, so the peak stays within the budget
        with st.spinner(f"Loading {choice.name} ..."):
            torch.set_num_threads(max(1, torch.get_num_threads()))
            adapter = load_adapter(
                choice.name,
                checkpoint=choice.checkpoint,
                tokenizer_checkpoint=choice.tokenizer_checkpoint,
                device=choice.device,
                seed=choice.seed,
            )
        with _MODELS_MU:
            _MODELS[choice] = (adapter, _adapter_bytes(adapter))
            _evict_to(budget)
            _LOADING.pop(choice, None)
        return adapter


def load_cost(choice: ModelChoice) -> str:
    """What loading `choice` costs, in words: parameters, memory, weights (for the confirmation button)."""
    n, b = model_size(choice.name)
    weights = (
        "with random weights (no checkpoint given: it has memorized nothing; give the official checkpoints in "
        "the sidebar to study the released model)"
        if choice.checkpoint is None
        else f"from {Path(choice.checkpoint).name}"
        + (f" and {Path(choice.tokenizer_checkpoint).name}" if choice.tokenizer_checkpoint else "")
    )
    try:
        dev = resolve_device(choice.device)
    except RuntimeError:
        dev = choice.device
    return (
        f"{choice.name} is a full-size model: {n / 1e6:,.0f} M parameters, about {b / 1e9:.1f} GB of memory on "
        f"{dev}, {weights}. Loading it takes seconds to minutes and it stays loaded for every "
        f"session while it fits the app's model memory budget ({config.model_memory_budget() / 1e9:.1f} GB)."
    )


def confirm(choice: ModelChoice) -> None:
    """Record in this browser session that the user asked for `choice` to be loaded (a button callback)."""
    st.session_state.setdefault("_confirmed_models", set()).add(choice)


def needs_confirmation(choice: ModelChoice) -> bool:
    """True for a full-size model not loaded yet that this session has not asked for with a click."""
    if get_spec(choice.name).kind != "released" or is_loaded(choice):
        return False
    return choice not in st.session_state.get("_confirmed_models", set())


def get_model() -> tuple[IARAdapter, ModelChoice]:
    """The shared model of the sidebar's choice; raises UserInputError with a readable message
    (NeedsConfirmation before a full-size model's first load in this session)."""
    choice = model_choice()
    if needs_confirmation(choice):
        raise NeedsConfirmation(load_cost(choice), choice)
    try:
        adapter = _load_model(choice)
    except UserInputError:
        raise
    except (CheckpointError, FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        log.warning("model load failed: %s", msg)
        raise UserInputError(f"Could not load {choice.name}: {msg}") from None
    return adapter, choice


def world_banner(name: str) -> None:
    """Which model of the demo world every page shows (in the sidebar, under the model choice)."""
    role = config.WORLD_ROLES.get(name)
    if role is not None:
        st.caption(f"**Demo world: {name}, {role[0]}.** {role[1]}")


@dataclass(frozen=True)
class DataChoice:
    source: str  # "demo" or a resolved folder path
    n: int
    seed: int
    size: int
    heldout: int = 0  # never-trained images added for the null control

    def args(self) -> DataArgs:
        return DataArgs(self.source, self.n, heldout=self.heldout)


def data_choice(adapter: IARAdapter) -> DataChoice:
    if state.get("data") == "folder":
        folder = _checked_path(state.get("folder"), "data folder")
        if folder is None:
            raise UserInputError(
                "Data folder: type the path of an ImageFolder tree (<root>/<class>/<images>) in "
                "the sidebar, or choose the demo data."
            )
        if not Path(folder).is_dir():
            raise UserInputError(f"Data folder: {folder} is a file; expected a folder of class sub-folders.")
        return DataChoice(folder, config.N_IMAGES, int(state.get("seed")), adapter.image_size)
    return DataChoice("demo", config.N_IMAGES, int(state.get("seed")), adapter.image_size)


@st.cache_resource(show_spinner="Reading the data ...", max_entries=8)
def _load_data(choice: DataChoice) -> data.ImageSet:
    if choice.source == "demo":
        return data.select_demo(n=choice.n, seed=choice.seed)
    return data.load_image_folder(
        choice.source, choice.size, count=choice.n, seed=choice.seed, allowed_roots=config.allowed_roots()
    )


def get_data(adapter: IARAdapter) -> tuple[data.ImageSet, DataChoice]:
    """The data selection D' of the sidebar's choice (demo: every planted image + a stratified sample)."""
    choice = data_choice(adapter)
    try:
        return _load_data(choice), choice
    except (data.PathNotAllowedError, FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
        raise UserInputError(f"Could not read the data: {e}") from None


N_NULL = 500  # never-trained images added to D' for the null control (as many as the training images)


@st.cache_resource(show_spinner="Reading the data ...", max_entries=8)
def _load_null_data(choice: DataChoice) -> data.ImageSet:
    return data.select_demo_with_null(n=choice.n, n_heldout=N_NULL, seed=choice.seed)


def get_null_data(adapter: IARAdapter) -> tuple[data.ImageSet, DataChoice] | None:
    """D' for UnitMem's null control: the selection plus as many never-trained images (demo: the held-out split);
    None for folder data (a folder of never-trained images is not wired into the app yet: use the CLI's
    --heldout-folder)."""
    choice = data_choice(adapter)
    if choice.source != "demo":
        return None
    return _load_null_data(choice), DataChoice(choice.source, choice.n, choice.seed, choice.size, heldout=N_NULL)


@st.cache_resource(max_entries=4)
def heldout_set() -> data.ImageSet:
    """The demo's held-out split (the extraction attack's false-positive control)."""
    return data.load_demo("heldout")


def is_demo_data(choice: DataChoice) -> bool:
    return choice.source == "demo"


def family(name: str) -> str:
    return get_spec(name).family
