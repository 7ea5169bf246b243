"""Model definitions: the DINOv2-style ViT backbone, DINO/iBOT heads, and the GLoRI / linear classifiers."""

from chexfound_jax.models.classifiers import ClassifierConfig, build_classifier, head_inputs
from chexfound_jax.models.heads import DINOHead, HeadConfig
from chexfound_jax.models.model import ModelConfig, abstract_params
from chexfound_jax.models.vit import VisionTransformer, ViTConfig, vit_config

__all__ = [
    "ClassifierConfig",
    "DINOHead",
    "HeadConfig",
    "ModelConfig",
    "ViTConfig",
    "VisionTransformer",
    "abstract_params",
    "build_classifier",
    "head_inputs",
    "vit_config",
]
