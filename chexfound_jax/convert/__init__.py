"""Weight conversion between chexfound_jax and the PyTorch CheXFound / DINOv2 / timm formats.

Backbones (with DINO/iBOT heads) go through `pytorch`; GLoRI and linear classification heads, in the
official `classifiers_dict.<name>.*` layout, through `heads`.
"""

from chexfound_jax.convert.head_checkpoints import export_classifier, import_classifier
from chexfound_jax.convert.layouts import LAYOUTS, ConversionError
from chexfound_jax.convert.pytorch import export_state_dict, import_state_dict

__all__ = [
    "LAYOUTS",
    "ConversionError",
    "export_classifier",
    "export_state_dict",
    "import_classifier",
    "import_state_dict",
]
