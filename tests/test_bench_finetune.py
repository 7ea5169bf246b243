"""bench/finetune_step.py and the shapes-only backbone it compiles: the step of a tiny LoRA-adapted ViT with a GLoRI
head, compiled for abstract sharded inputs on the 8 simulated devices, then run on arrays."""

import jax
import numpy as np
from helpers import random_params
from jax.sharding import PartitionSpec

from bench import finetune_step
from chexfound_jax.eval.finetune import Adaptation, AdaptedFeatures
from chexfound_jax.models.lora import LoRAConfig
from chexfound_jax.models.vit import ViTConfig
from chexfound_jax.parallel import topology
from chexfound_jax.parallel.mesh import create_mesh
from configs.eval import finetune_cxrlt

VIT = ViTConfig(embed_dim=32, depth=2, num_heads=2, patch_size=16, img_size=32, num_register_tokens=0, ffn_layer="mlp")
RANK = 4


def _config():
    cfg = finetune_cxrlt.get_config()
    cfg.data.image_size = 32
    cfg.backbone.n_last_blocks = 1
    cfg.backbone.lora.rank = RANK
    cfg.head.update(decoder_dim=16, num_heads=2, ffn_dim=32)
    return cfg


def _sizes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), x.sharding), tree)


def test_shapes_only_backbone_is_the_built_one_without_weights():
    mesh = create_mesh({"data": 1, "fsdp": -1})
    adapt = Adaptation("lora", lora=LoRAConfig(rank=RANK))
    built = AdaptedFeatures(VIT, random_params(VIT), 1, "float32", adapt, mesh, "fsdp")
    shapes = AdaptedFeatures(VIT, None, 1, "float32", adapt, mesh, "fsdp")
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes.state))  # nothing allocated
    assert _sizes(shapes.state) == _sizes(built.state)
    assert _sizes(shapes.initial) == _sizes(built.initial)
    # the FSDP rules split the kernels over the 8 devices, as for the built backbone
    assert shapes.state["blocks"][0]["attn"]["qkv"]["kernel"].sharding.spec == PartitionSpec("fsdp", None)


def test_tiny_step_compiled_for_shapes_runs_and_counts_what_trains():
    cfg, n = _config(), jax.device_count()
    report = finetune_step.measure(cfg, VIT, "lora", topology.get_topology("local"), 1, steps=1, warmup=1)
    d, depth = VIT.embed_dim, VIT.depth
    # LoRA on each block's qkv (d -> 3d) and proj (d -> d), A (r, in) and B (out, r), and on the patch embedding's
    # conv, which "proj" names too (patch_embed.proj, as peft matches it): A (r, 3, p, p), B (d, r); plus the biases
    # of the adapted layers (peft's lora_only)
    adapters = depth * RANK * ((d + 3 * d) + (d + d)) + RANK * (3 * VIT.patch_size**2 + d)
    assert report["trainable_backbone_params"] == adapters + depth * (3 * d + d) + d
    assert report["backbone_params"] == sum(int(np.size(x)) for x in jax.tree.leaves(random_params(VIT))) + adapters
    assert report["global_batch"] == n and report["mesh"] == {"data": 1, "fsdp": n}
    assert report["head"] == {"kind": "glori", "num_classes": 40, "cat_cls": True}
    assert report["fits"] is None  # no HBM capacity for a CPU
    memory = report["memory"]
    assert memory["peak"] == memory["argument"] + memory["output"] + memory["temp"] - memory["alias"] > 0
    assert report["compiled_matmul_flops_per_device"] > 0
    assert report["timing"]["steps"] == 1 and np.isfinite(report["timing"]["loss"])
    text = finetune_step.format_report(report)
    assert text.startswith("adapt=lora: local 8 x cpu") and "timed here" in text
