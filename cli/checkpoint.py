"""Checkpoints of a training run, written so that a crash at any moment leaves a usable one behind.

``DIR/checkpoint/`` holds ``model.safetensors`` (the module's state_dict: weights and buffers) and
``state.pt`` (torch.save: the optimizer's state, the step count, RNG states, the position in the data
order, the elapsed time and the run's settings). A new checkpoint is built in a hidden sibling folder,
every file fsynced, then swapped in with two renames (the old one is moved aside first, because a
folder cannot replace a non-empty folder in one rename); if a crash falls between them, loading falls
back to the folder moved aside. Single files (the final model) go through a temp file and os.replace.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kronograph.errors import KronographError

CHECKPOINT = "checkpoint"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
_ASIDE = ".checkpoint.old"
FORMAT = 1


def fsync_path(path: Path) -> None:
    """Flush a file or a folder entry to disk (folders: so that a rename inside them survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temp)`` on a temp file next to ``path``, fsync it, then os.replace it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")  # write() creates it
    try:
        write(temp)
        temp.chmod(0o666 & ~_umask())  # some writers (safetensors) create private files
        fsync_path(temp)
        os.replace(temp, path)
        fsync_path(path.parent)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied weights) and non-contiguous views: give it own copies."""
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}


def save_weights(path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """The module's state_dict as a safetensors file, atomically."""
    tensors = _tensors(state)
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))


def save_checkpoint(run_dir: Path, weights: Mapping[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint/`` (weights + state, state["step"] required) and return its path."""
    final, aside = run_dir / CHECKPOINT, run_dir / _ASIDE
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run_dir))
    try:
        save_file(_tensors(weights), str(staging / WEIGHTS), metadata={"step": str(state["step"])})
        torch.save({"format": FORMAT, **state}, staging / STATE)
        for path in (staging / WEIGHTS, staging / STATE, staging):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())
            fsync_path(path)
        if final.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(staging, final)
        fsync_path(run_dir)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The run's checkpoint folder (or the one moved aside by a swap a crash interrupted), or None."""
    for folder in (run_dir / CHECKPOINT, run_dir / _ASIDE):
        if (folder / STATE).is_file() and (folder / WEIGHTS).is_file():
            return folder
    return None


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and state of ``run_dir``'s checkpoint; KronographError when it is missing or corrupt."""
    folder = checkpoint_dir(run_dir)
    if folder is None:
        raise KronographError(
            f"{run_dir} holds no checkpoint ({CHECKPOINT}/{WEIGHTS} and {CHECKPOINT}/{STATE}); "
            "give --resume the --out folder of an earlier run, or start a new run with --out"
        )
    fix = "resume from another run folder or start a new run with --out"
    try:
        with safe_open(str(folder / WEIGHTS), "pt") as opened:  # metadata: the step the weights belong to
            metadata = opened.metadata() or {}
            weights = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise KronographError(f"{folder / WEIGHTS} is corrupt ({_first_line(error)}); {fix}") from None
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise KronographError(f"{folder / STATE} is corrupt ({_first_line(error)}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise KronographError(f"{folder / STATE} is not a kronograph checkpoint of format {FORMAT}; {fix}")
    if metadata.get("step") != str(state["step"]):
        raise KronographError(f"{folder}: the weights are of step {metadata.get('step')} but the state of step "
                              f"{state['step']}; the checkpoint is damaged, {fix}")
    return weights, state


def check_same_model(weights: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                     where: Path) -> None:
    """Refuse a checkpoint whose parameter names or shapes differ from the model's, naming the first difference."""
    fix = "resume with the MODEL that wrote it, or start a new run with another --out"
    missing = [name for name in model_state if name not in weights]
    extra = [name for name in weights if name not in model_state]
    if missing or extra:
        parts = ([f"the model's {missing[0]!r} is not in it"] if missing else []) + (
            [f"its {extra[0]!r} is not in the model"] if extra else [])
        raise KronographError(f"the checkpoint in {where} is from a different model ({'; '.join(parts)}); {fix}")
    for name, tensor in model_state.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise KronographError(
                f"the checkpoint in {where} is from a different model: {name!r} has shape "
                f"{list(weights[name].shape)} there and {list(tensor.shape)} here; {fix}"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def rng_state() -> dict[str, Any]:
    """torch's global generators (dropout and anything else a module draws at run time)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])
