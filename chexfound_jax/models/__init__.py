"""Model definitions: the DINOv2-style ViT backbone, DINO/iBOT heads (and later GLoRI)."""

from chexfound_jax.models.heads import DINOHead, HeadConfig
from chexfound_jax.models.model import ModelConfig, abstract_params
from chexfound_jax.models.vit import VisionTransformer, ViTConfig, vit_config

__all__ = ["DINOHead", "HeadConfig", "ModelConfig", "ViTConfig", "VisionTransformer", "abstract_params", "vit_config"]
