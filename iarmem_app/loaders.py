"""Cached loading of models and data for every browser session.

A model is loaded once per (name, checkpoint files, device, seed) with st.cache_resource and shared by all
sessions. It holds no per-session state: edits and captures are `with` blocks from iarmem_core.hooks that
live in the calling thread only. Typed paths must resolve inside the allowed roots; every failure becomes
an st.error naming the file and the fix, never a traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

from iarmem_app import config, state
from iarmem_core import data
from iarmem_core.adapters import IARAdapter, load_adapter, resolve_device
from iarmem_core.checkpoints import CheckpointError
from iarmem_core.cli.commands import DataArgs, ModelArgs
from iarmem_core.registry import get_spec

log = logging.getLogger("iarmem.app")


class UserInputError(Exception):
    """A problem with what the user typed or chose; its message says what to do."""


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


@st.cache_resource(show_spinner="Loading the model ...", max_entries=4)
def _load_model(choice: ModelChoice) -> IARAdapter:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_adapter(
        choice.name,
        checkpoint=choice.checkpoint,
        tokenizer_checkpoint=choice.tokenizer_checkpoint,
        device=choice.device,
        seed=choice.seed,
    )


def get_model() -> tuple[IARAdapter, ModelChoice]:
    """The shared model of the sidebar's choice; raises UserInputError with a readable message."""
    choice = model_choice()
    try:
        return _load_model(choice), choice
    except (CheckpointError, FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        log.warning("model load failed: %s", msg)
        raise UserInputError(f"Could not load {choice.name}: {msg}") from None


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
