"""Pretrained weights shipped inside the package, by name: `unetseg-predict --model nuclei`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["MODELS", "available_models", "model_path"]

# name -> checkpoint file in this folder. A file may be missing from a given install (large
# weights are added at release time); `available_models` lists those actually present.
MODELS = {"nuclei": "nuclei.ckpt"}


def weights_dir() -> Path:
    """The folder holding the shipped weight files (this package's folder)."""
    return Path(str(resources.files(__name__)))


def available_models() -> list[str]:
    """Names in MODELS whose weight file is installed."""
    folder = weights_dir()
    return sorted(name for name, file in MODELS.items() if (folder / file).is_file())


def model_path(name: str) -> Path:
    """The checkpoint file of the shipped model `name`.

    Raises ValueError for a name not in MODELS and FileNotFoundError for a known model whose
    weights are not installed; both messages list the models that are available.
    """
    available = ", ".join(available_models()) or "none installed"
    if name not in MODELS:
        looks_like_a_file = "/" in name or "\\" in name or Path(name).suffix != ""
        hint = " (--model takes a shipped model's name; give a checkpoint file with --checkpoint)"
        raise ValueError(f"unknown model {name!r}{hint if looks_like_a_file else ''}; available models: {available}")
    path = weights_dir() / MODELS[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"model {name!r} is not installed (no {path}); available models: {available}; "
            "or use a checkpoint file of your own"
        )
    return path
