"""Reading and writing PyTorch checkpoint files (.pth, .safetensors) as dicts of numpy arrays.

torch is an optional dependency (`pip install chexfound-jax[torch]`); .pth files are untrusted
input and are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from chexfound_jax.convert.layouts import ConversionError


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("PyTorch conversion needs torch: pip install 'chexfound-jax[torch]'") from e
    return torch


def _to_numpy(tensor: Any) -> np.ndarray:
    torch = _torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; widen exactly
        tensor = tensor.float()
    return tensor.numpy()


def read_checkpoint(path: str | epath.Path) -> dict[str, Any]:
    """The file's top-level object: a (possibly nested) dict with numpy leaves."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load

        return dict(load(path.read_bytes()))
    torch = _torch()
    with path.open("rb") as f:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(f"{path}: cannot be read as a weights-only PyTorch checkpoint: {e}") from e
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: top level is a {type(obj).__name__}, not a state dict")
    return _nested_numpy(obj, str(path))


def _nested_numpy(obj: Mapping, where: str) -> dict[str, Any]:
    torch = _torch()
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[key] = _to_numpy(value)
        elif isinstance(value, Mapping):
            out[key] = _nested_numpy(value, f"{where}[{key!r}]")
        else:
            out[key] = value  # e.g. "iteration": 0; callers decide whether it matters
    return out


def write_checkpoint(state_dict: Mapping[str, np.ndarray], path: str | epath.Path, wrapper: str | None = None) -> None:
    """Writes a flat state dict as .safetensors (flat) or .pth (`{wrapper: sd}` when given)."""
    path = epath.Path(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        path.write_bytes(save(tensors))
        return
    torch = _torch()
    sd = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    with path.open("wb") as f:
        torch.save({wrapper: sd} if wrapper else sd, f)
