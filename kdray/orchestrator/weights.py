"""Reading model weights from files: only tensors, never pickled code; every failure one line.

Why one module: a teacher checkpoint, an MLflow artifact, a teacher cache's recorded teacher and a resumed
stage all read weights; each must refuse a pickle that would run code and name the file that is wrong.
"""
from __future__ import annotations

import pickle

import torch
import torch.nn as nn

from kdray.config import ConfigError


def unwrap_state(state: dict) -> dict:
    """RepDistiller / mdistiller save ``{"model": state_dict, ...}``; accept those and plain state_dicts."""
    for key in ("model", "state_dict", "student"):
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def load_weights(model: nn.Module, state: dict, source: str, num_classes: int) -> nn.Module:
    """Load ``state`` into ``model``; a class-count or architecture mismatch is a one-line error."""
    state = unwrap_state(state)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ConfigError(
                f"{source}: parameter {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(own[key].shape)} (dataset has {num_classes} classes; is it the same architecture "
                f"and class count?)"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{source}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def read_weights(path: str, what: str) -> dict:
    """A state_dict from a file, read with ``torch.load(weights_only=True)``: tensors and plain containers only,
    never pickled code (a checkpoint that holds objects is refused, not unpickled). A file that cannot be read
    is a one-line :class:`ConfigError` naming ``what`` (the config key) and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), "it holds pickled objects")
        raise ConfigError(f"{what} {path} was refused: it holds pickled objects, not only weights ({detail}); "
                          f"kdray reads only tensors / state_dicts, never pickled code: save the model with "
                          f"torch.save(model.state_dict(), path)") from None
    except (OSError, EOFError, RuntimeError, ValueError) as err:  # cut short, or not a torch file at all
        raise ConfigError(f"{what} {path} is not a readable torch checkpoint (truncated or corrupt: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}); save it again with "
                          f"torch.save(model.state_dict(), path)") from None
