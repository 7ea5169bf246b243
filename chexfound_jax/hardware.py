"""Public per-chip figures of the accelerators users rent: the one table MFU, rooflines and fit checks use.

All figures are per chip (a TPU chip, or one GPU), dense bf16 matmul peak (no sparsity), HBM capacity
and bandwidth, and the chip's total bidirectional interconnect bandwidth (TPU ICI, NVLink). Sources:
  TPU v4:  cloud.google.com/tpu/docs/v4 -- 275 TFLOP/s, 32 GiB HBM2 at 1200 GB/s; ICI from the pod's
           1.1 PB/s all-reduce bandwidth over 4096 chips x 2 (bidirectional) = 540 GB/s.
  TPU v5e: cloud.google.com/tpu/docs/v5e -- 197 TFLOP/s, 16 GiB at 819 GB/s, ICI 400 GB/s.
  TPU v5p: cloud.google.com/tpu/docs/v5p -- 459 TFLOP/s, 95 GiB at 2765 GB/s, ICI 1200 GB/s.
  TPU v6e: cloud.google.com/tpu/docs/v6e -- 918 TFLOP/s, 32 GB at 1638 GB/s, ICI 800 GB/s.
  H100 SXM: NVIDIA H100 datasheet -- 989.4 TFLOP/s bf16 dense (1979 with sparsity), 80 GB HBM3 at
           3.35 TB/s, NVLink 900 GB/s; H100 PCIe 756 TFLOP/s, 80 GB at 2.0 TB/s, NVLink bridge 600 GB/s;
           H100 NVL 835 TFLOP/s, 94 GB at 3.9 TB/s, NVLink bridge 600 GB/s.
  H200 SXM: NVIDIA H200 datasheet -- 989.4 TFLOP/s, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s;
           H200 NVL 835 TFLOP/s, 141 GB at 4.8 TB/s.
  A100 SXM 80GB: NVIDIA A100 datasheet -- 312 TFLOP/s, 80 GB at 2039 GB/s, NVLink 600 GB/s.
Capacities are taken in the unit the vendor states (GiB for v4/v5e/v5p, GB otherwise), so a fit
check against them errs on the safe side where the vendor rounds.
"""

from __future__ import annotations

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kinds: tuple[str, ...]  # substrings of jax's device_kind, matched case-insensitively
    peak_bf16_flops: float  # FLOP/s, dense
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    interconnect_bandwidth: float  # bytes/s per chip, bidirectional (ICI / NVLink)
    source: str


CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip("TPU v4", ("TPU v4",), 275e12, 32 * GIB, 1200e9, 540e9, "cloud.google.com/tpu/docs/v4"),
        Chip("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GIB, 819e9, 400e9, "cloud.google.com/tpu/docs/v5e"),
        Chip("TPU v5p", ("TPU v5p", "TPU v5"), 459e12, 95 * GIB, 2765e9, 1200e9, "cloud.google.com/tpu/docs/v5p"),
        Chip("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32e9, 1638e9, 800e9, "cloud.google.com/tpu/docs/v6e"),
        Chip("H100 SXM", ("H100",), 989.4e12, 80e9, 3.35e12, 900e9, "NVIDIA H100 datasheet"),
        Chip("H100 PCIe", ("H100 PCIe",), 756e12, 80e9, 2.0e12, 600e9, "NVIDIA H100 datasheet"),
        Chip("H100 NVL", ("H100 NVL",), 835e12, 94e9, 3.9e12, 600e9, "NVIDIA H100 datasheet"),
        Chip("H200 SXM", ("H200",), 989.4e12, 141e9, 4.8e12, 900e9, "NVIDIA H200 datasheet"),
        Chip("H200 NVL", ("H200 NVL",), 835e12, 141e9, 4.8e12, 900e9, "NVIDIA H200 datasheet"),
        Chip("A100 SXM", ("A100",), 312e12, 80e9, 2039e9, 600e9, "NVIDIA A100 datasheet"),
    )
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The table's chip whose longest device-kind key is in `device_kind` ("TPU v5 lite" -> v5e, not v5p)."""
    kind = device_kind.lower()
    best: tuple[int, Chip] | None = None
    for chip in CHIPS.values():
        for key in chip.device_kinds:
            if key.lower() in kind and (best is None or len(key) > best[0]):
                best = (len(key), chip)
    return best[1] if best else None


def peak_flops(device_kind: str, override: float | None = None) -> float | None:
    """Per-chip peak bf16 FLOP/s: `override` if given, else the table's; None for CPUs and unknown chips,
    so MFU is left out rather than reported against a guess."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak FLOP/s override must be positive, got {override}")
        return float(override)
    chip = chip_for_device_kind(device_kind)
    return chip.peak_bf16_flops if chip else None
