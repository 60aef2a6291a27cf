"""The model on a Dask cluster's workers: loaded once on each (a worker plugin), and what the client keeps of it
(`ClusterModel`: its input spec, dims, fingerprint and plugin name)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from distributed import Client
from torch import nn

from unetseg.distributed.worker import PLUGIN, ModelPlugin, model_info
from unetseg.spec import InputSpec

__all__ = ["ClusterModel", "use_model"]


@dataclass(frozen=True)
class ClusterModel:
    """The model loaded on the workers: its input spec, its spatial dims (2 or 3), what identifies it (a resumed
    run must use the same model) and the name of its plugin on the workers (several models may be loaded)."""

    spec: InputSpec
    dims: int
    fingerprint: str
    plugin: str


def _fingerprint(checkpoint: Path | None, model: nn.Module | None) -> str:
    """A model file's path, size and time; or a hash of a network's weights."""
    if checkpoint is not None:
        stat = checkpoint.stat()
        return f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(model).__name__}:{digest.hexdigest()}"


def use_model(
    client: Client,
    model: str | Path | tuple[nn.Module, InputSpec],
    device: str = "auto",
    torch_threads: int | None = None,
) -> ClusterModel:
    """Load a model on every worker, once each (a worker plugin; workers that join later load it too).

    Args:
        client: the cluster's client.
        model: a model file every worker can read at this path (checkpoint, .onnx, bioimage.io .zip), or a
            (network, input spec) pair, sent to the workers pickled.
        device: "auto" (each worker's GPU when it has one, else its CPU), "cpu" or "cuda".
        torch_threads: torch threads per worker (None: torch's default).
    """
    if isinstance(model, tuple):
        network, spec = model
        plugin = ModelPlugin(model=network, spec=spec, device=device, torch_threads=torch_threads)
        fingerprint = _fingerprint(None, network)
    else:
        checkpoint = Path(model).resolve()
        if not checkpoint.is_file():
            raise ValueError(f"{model}: no such model file (workers load it by this path)")
        plugin = ModelPlugin(checkpoint=str(checkpoint), device=device, torch_threads=torch_threads)
        fingerprint = _fingerprint(checkpoint, None)
    name = f"{PLUGIN}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"
    client.register_plugin(plugin, name=name)
    dims, spec = client.submit(model_info, name, pure=False).result()
    return ClusterModel(spec, dims, fingerprint, name)
