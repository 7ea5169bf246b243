"""Shared test helpers: golden files, tiny model configs, and an importable timm on CPU."""

from __future__ import annotations

import csv
import gzip
import math
import os
import pathlib
import subprocess
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from chexfound_jax.models.build import model_from_params  # noqa: F401 - re-exported for tests
from chexfound_jax.models.vit import ViTConfig, abstract_vit_params

DATA = pathlib.Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
IMAGES = sorted((DATA / "images").glob("*.png"))
TINY_TEACHER = GOLDEN / "vit_tiny_teacher_checkpoint.pth"
TINY_HUB = GOLDEN / "vit_tiny_hub.pth"
TINY_HEADS = 4  # the golden tiny backbone: embed 64, 4 heads (not DINOv2's 64-d head default)
REPO = pathlib.Path(__file__).resolve().parents[1]


def child_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a JAX program the test starts: CPU, `devices` simulated devices, the session's unoptimised
    XLA:CPU code (conftest: compiles dominate, and every run a test compares is compiled the same way), the
    repository importable; `extra` variables on top."""
    xla = ["--xla_backend_optimization_level=0"]
    if devices > 1:
        xla.append(f"--xla_force_host_platform_device_count={devices}")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(xla), "PYTHONPATH": path, **extra}


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def random_params(cfg: ViTConfig, seed: int = 0, scale: float = 0.1) -> dict:
    """Backbone parameters with every leaf random (numpy), so each one visibly changes outputs.

    Norm scales and LayerScale gammas are centred on 1 and 0.1 so activations stay well scaled.
    Much faster than an eager NNX init for tests that only need values.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        return _random_leaf(path, spec).astype(spec.dtype)

    def _random_leaf(path, spec):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(spec.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.1 * x
        if "gamma" in name:
            return 0.1 + 0.05 * x
        if "kernel" in name:
            return x / np.sqrt(np.prod(spec.shape[:-1]))
        return scale * x

    return jax.tree_util.tree_map_with_path(leaf, abstract_vit_params(cfg))


def import_timm():
    """timm, importable on a CPU-only torch.

    PyPI's torchvision is a CUDA build whose import registers fake kernels for its C++ ops and
    fails when those ops do not exist; defining the two it touches first is enough for timm.
    """
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when torchvision's C++ ops load
    except (AttributeError, RuntimeError):
        if not hasattr(import_timm, "_lib"):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            import_timm._lib = lib
    import timm

    return timm


def equivalence_config():
    """The tiny pretraining config used to compare sharded, multi-host and single-device steps."""
    from configs.pretrain import tiny_cpu

    c = tiny_cpu.get_config()
    c.optim.update(base_lr=0.02, warmup_epochs=0)  # visible updates in two steps
    c.model.drop_path_rate = 0.0
    # Adam's first steps divide each gradient by its own magnitude: with eps 1e-8 a gradient of ~1e-9
    # whose rounding differs between reduction orders moves its parameter by a different fraction of
    # the lr. A larger eps keeps the comparison about the step, not about that amplification.
    c.optim.adamw_eps = 1e-4
    return c


def setup_train(cfg, mesh_axes, rules, devices=None):
    """(state, compiled step, batch spec, batch shardings) for a config on a mesh."""
    from chexfound_jax.train.setup import build_training

    training = build_training(cfg, mesh_axes, rules, devices)
    return training.init_state(), training.step, training.batch_spec, training.batch_shardings


def random_batches(cfg, spec, n, seed=0):
    """n global batches of random-normal crops with real iBOT masks (same for every caller)."""
    from chexfound_jax.data.collate import synthetic_batch

    rng = np.random.default_rng(seed)
    return [synthetic_batch(cfg, spec, rng) for _ in range(n)]


GLORI_PTH = GOLDEN / "glori.pth"
GLORI_CATCLS_PTH = GOLDEN / "glori_catcls.pth"


def torch_glori(
    num_classes, feature_dim, decoder_dim, *, num_heads=8, ffn_dim=2048, cat_cls=False, dropout=0.1, eps=1e-5
):
    """An independent PyTorch GLoRI written from the official classification/glori.py, with its state-dict keys.

    forward(patch (B, N, F), cls (B, F)) -> (logits (B, K), attention (B, heads, K, N)). The decoder
    layer is sequence-first torch.nn.MultiheadAttention, as in ML-Decoder.
    """
    import torch
    from torch import nn

    class DecoderLayer(nn.Module):  # attribute order = the official state-dict order
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(decoder_dim, eps=eps)
            self.multihead_attn = nn.MultiheadAttention(decoder_dim, num_heads, dropout=dropout)
            self.linear1 = nn.Linear(decoder_dim, ffn_dim)
            self.dropout = nn.Dropout(dropout)
            self.linear2 = nn.Linear(ffn_dim, decoder_dim)
            self.norm2 = nn.LayerNorm(decoder_dim, eps=eps)
            self.norm3 = nn.LayerNorm(decoder_dim, eps=eps)
            self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

        def forward(self, tgt, memory):  # (K, B, d), (N, B, d)
            tgt = self.norm1(tgt + self.dropout1(tgt))
            a, weights = self.multihead_attn(tgt, memory, memory, need_weights=True, average_attn_weights=False)
            tgt = self.norm2(tgt + self.dropout2(a))
            tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(torch.relu(self.linear1(tgt))))))
            return tgt, weights

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([DecoderLayer()])
            self.embed_standart = nn.Linear(feature_dim, decoder_dim)
            self.query_embed = nn.Embedding(num_classes, decoder_dim)
            self.query_embed.requires_grad_(False)
            pooled = decoder_dim + (feature_dim if cat_cls else 0)
            self.duplicate_pooling = nn.Parameter(torch.empty(num_classes, pooled, 1))
            self.duplicate_pooling_bias = nn.Parameter(torch.zeros(num_classes))
            nn.init.xavier_normal_(self.duplicate_pooling)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()

        def forward(self, patch, cls):
            dec = self.decoder
            memory = torch.relu(dec.embed_standart(patch)).transpose(0, 1)
            tgt = dec.query_embed.weight.unsqueeze(1).expand(-1, patch.shape[0], -1)
            h, attention = dec.layers[0](tgt, memory)
            h = h.transpose(0, 1)
            if cat_cls:
                h = torch.cat([cls.unsqueeze(1).expand(-1, h.shape[1], -1), h], dim=-1)
            logits = torch.stack([h[:, k] @ dec.duplicate_pooling[k, :, 0] for k in range(h.shape[1])], dim=1)
            return logits + dec.duplicate_pooling_bias, attention

    return Head()


def torch_linear_probe(in_features, num_classes):
    """DINOv2's LinearClassifier core: state-dict keys linear.weight / linear.bias."""
    from torch import nn

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(in_features, num_classes)

        def forward(self, x):
            return self.linear(x)

    return Probe()


def run_processes(
    commands: Sequence[Sequence[str]], env: Mapping[str, str], cwd=None, timeout: float = 600
) -> list[str]:
    """Starts every command at once (the processes of one jax.distributed job) and waits for all of them.

    Returns each process's output (stdout and stderr); fails the test with both logs' tails if any exits non-zero.
    """
    procs = [
        subprocess.Popen(list(c), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs


# --- fake releases for data_prep source adapters ---------------------------------------------------


def write_csv(path: pathlib.Path, header: list[str], rows: list[list[object]], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open(path, "wt", newline="") if gz else path.open("w", newline="")
    with opener as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def touch(root: pathlib.Path, relpath: str) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placeholder")


def same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Label tuples equal, NaN matching NaN."""
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def by_id(items: list) -> dict:
    return {item.image_id: item for item in items}
