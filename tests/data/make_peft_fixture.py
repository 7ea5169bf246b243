"""Writes peft_lora_layout.json and peft_lora_outputs.npz: what Hugging Face peft makes of the CheXFound backbone.

Not part of the test suite and not a project dependency: run once, by hand, in an environment with peft
(`pip install peft`), from the repository root:

    python tests/data/make_peft_fixture.py

The backbone is a PyTorch module tree with the official DINOv2 / CheXFound module names (loaded with
strict=True from the golden tiny checkpoints, so every name is the official one), wrapped as the official
evaluation code wraps it: get_peft_model(vit, LoraConfig(r=16, lora_alpha=16, target_modules=["qkv", "proj"],
lora_dropout=0.1, bias="lora_only")). The JSON records, for the chunked (block_chunks=4, as the official
evaluation builds the backbone) and the flat (block_chunks=0) module trees: the keys, shapes and dtypes that
save_pretrained writes to adapter_model.safetensors, the adapter_config.json it writes, and the parameters
peft leaves trainable. The npz holds a second adapter (r=4, alpha=8, random A and B) on the flat tree and
what peft's wrapped layers compute with it (eval mode) for qkv and proj of block 0 and the patch embedding.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

try:  # a CUDA torchvision on a CPU torch cannot register its ops; transformers (imported by peft) imports it
    torch.ops.torchvision.nms  # noqa: B018
except (AttributeError, RuntimeError):
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import peft

DATA = pathlib.Path(__file__).parent
GOLDEN = DATA / "golden"
OFFICIAL = dict(r=16, lora_alpha=16, target_modules=["qkv", "proj"], lora_dropout=0.1, bias="lora_only")
NUMERIC = dict(r=4, lora_alpha=8, target_modules=["qkv", "proj"], lora_dropout=0.1, bias="lora_only")


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class LayerScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(d))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * hidden)
        self.w3 = nn.Linear(hidden, d)


class Block(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = SwiGLU(d, hidden)
        self.ls2 = LayerScale(d)


class PatchEmbed(nn.Module):
    def __init__(self, d, p):
        super().__init__()
        self.proj = nn.Conv2d(3, d, p, p)


class ViT(nn.Module):
    """Module names of the official DinoVisionTransformer; chunks padded with Identity as its BlockChunk."""

    def __init__(self, d=64, depth=4, hidden=176, p=16, grid=32, registers=4, chunks=0):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = PatchEmbed(d, p)
        blocks = [Block(d, hidden) for _ in range(depth)]
        if chunks:
            size = depth // chunks
            lists = [[nn.Identity()] * i + blocks[i : i + size] for i in range(0, depth, size)]
            self.blocks = nn.ModuleList([nn.ModuleList(chunk) for chunk in lists])
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)


def golden_backbone(chunks: int) -> ViT:
    if chunks:
        sd = torch.load(GOLDEN / "vit_tiny_teacher_checkpoint.pth", weights_only=True)["teacher"]
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    else:
        sd = torch.load(GOLDEN / "vit_tiny_hub.pth", weights_only=True)
    model = ViT(chunks=chunks)
    model.load_state_dict(sd, strict=True)
    return model


def saved_adapter(model: nn.Module) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tmp = pathlib.Path(tmp)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["target_modules"] = sorted(config["target_modules"])  # a set in peft: written in any order
        with safe_open(str(tmp / "adapter_model.safetensors"), "pt") as f:
            keys = [
                {"key": k, "shape": list(f.get_tensor(k).shape), "dtype": str(f.get_tensor(k).dtype)} for k in f.keys()
            ]
    return keys, config


def layout(chunks: int) -> dict:
    torch.manual_seed(0)
    model = peft.get_peft_model(golden_backbone(chunks), peft.LoraConfig(**OFFICIAL))
    keys, config = saved_adapter(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"adapter_model.safetensors": keys, "adapter_config.json": config, "trainable": trainable}


def numeric() -> dict[str, np.ndarray]:
    torch.manual_seed(1)
    model = peft.get_peft_model(golden_backbone(0), peft.LoraConfig(**NUMERIC))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.eval()
    base = model.base_model.model
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        tokens = torch.randn(2, 5, 64)
        image = torch.randn(1, 3, 32, 48)
        out["tokens"] = tokens.numpy()
        out["image"] = image.numpy()
        out["qkv_out"] = base.blocks[0].attn.qkv(tokens).numpy()
        out["proj_out"] = base.blocks[0].attn.proj(tokens).numpy()
        out["patch_out"] = base.patch_embed.proj(image).numpy()
        adapter = peft.get_peft_model_state_dict(model)
    for key, value in adapter.items():
        out[f"adapter/{key}"] = value.numpy()
    out["README"] = np.array(
        json.dumps(
            {
                "config": NUMERIC,
                "peft": peft.__version__,
                "torch": torch.__version__,
                "tokens": "(2, 5, 64) input of blocks.0.attn.qkv and blocks.0.attn.proj",
                "image": "(1, 3, 32, 48) NCHW input of patch_embed.proj",
                "*_out": "what peft's wrapped layer returns (eval mode: no dropout); patch_out is NCHW",
                "adapter/*": "get_peft_model_state_dict: the adapter as save_pretrained writes it",
                "base": "the golden vit_tiny_hub.pth backbone",
            }
        )
    )
    return out


def main() -> None:
    fixture = {
        "README": (
            "Written by tests/data/make_peft_fixture.py with peft "
            f"{peft.__version__} and torch {torch.__version__.split('+')[0]} on the golden tiny backbone "
            "(embed 64, depth 4, patch 16, SwiGLU); adapter config as the official CheXFound evaluation's."
        ),
        "peft_version": peft.__version__,
        "lora_config": OFFICIAL,
        "chunked": layout(chunks=4),
        "flat": layout(chunks=0),
    }
    (DATA / "peft_lora_layout.json").write_text(json.dumps(fixture, indent=1) + "\n")
    np.savez_compressed(DATA / "peft_lora_outputs.npz", **numeric())


if __name__ == "__main__":
    main()
