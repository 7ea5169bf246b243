"""Weight conversion between chexfound_jax and the PyTorch CheXFound / DINOv2 / timm formats."""

from chexfound_jax.convert.layouts import LAYOUTS, ConversionError
from chexfound_jax.convert.pytorch import export_state_dict, import_state_dict

__all__ = ["LAYOUTS", "ConversionError", "export_state_dict", "import_state_dict"]
