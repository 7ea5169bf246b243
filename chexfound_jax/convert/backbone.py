"""One reader for the backbone a program is given with --checkpoint: a chexfound_jax weights directory, or
an official / DINOv2 PyTorch checkpoint (.pth, .safetensors), converted on the fly."""

from __future__ import annotations

from etils import epath

from chexfound_jax.models import weights
from chexfound_jax.models.vit import ViTConfig


def load_backbone(checkpoint: str | epath.PathLike, num_heads: int | None = None) -> tuple[ViTConfig, dict]:
    """(backbone config, backbone params); `num_heads` for PyTorch backbones whose heads are not 64 wide."""
    path = epath.Path(checkpoint)
    if path.is_dir():
        cfg, params = weights.load_weights(path)
        return cfg.backbone, params["backbone"]
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint} not found")
    from chexfound_jax.convert import pytorch, torch_io

    cfg, params = pytorch.import_state_dict(torch_io.read_checkpoint(path), num_heads=num_heads)
    return cfg.backbone, params["backbone"]
