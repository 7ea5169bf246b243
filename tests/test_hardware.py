"""chexfound_jax.hardware: the one table of chip figures (peak FLOP/s for MFU, HBM, bandwidths)."""

import pytest

from chexfound_jax import hardware


@pytest.mark.parametrize(
    ("kind", "want"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("cpu", None),
    ],
)
def test_peak_flops_table(kind, want):
    assert hardware.peak_flops(kind) == want


@pytest.mark.parametrize(
    ("kind", "chip"),
    [
        ("TPU v5 lite", "TPU v5e"),  # not v5p, though "TPU v5" is in the name too
        ("TPU v5", "TPU v5p"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("nvidia h200 nvl", "H200 NVL"),  # case-insensitive
    ],
)
def test_chip_for_device_kind_longest_key_wins(kind, chip):
    assert hardware.chip_for_device_kind(kind).name == chip


def test_unknown_kinds_have_no_chip():
    assert hardware.chip_for_device_kind("cpu") is None
    assert hardware.chip_for_device_kind("TFRT_CPU_0") is None


def test_every_chip_has_positive_figures_and_a_source():
    assert hardware.CHIPS
    for name, chip in hardware.CHIPS.items():
        assert chip.name == name and chip.device_kinds, chip
        for field in ("peak_bf16_flops", "hbm_bytes", "hbm_bandwidth", "interconnect_bandwidth"):
            assert getattr(chip, field) > 0, (name, field)
        assert chip.source.strip(), name
        for key in chip.device_kinds:  # each chip is found by each of its own keys
            assert hardware.chip_for_device_kind(key) is chip, (name, key)


def test_peak_override():
    assert hardware.peak_flops("cpu", 1e12) == 1e12
    assert hardware.peak_flops("TPU v4", 5e14) == 5e14  # the override wins over the table
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="must be positive"):
            hardware.peak_flops("cpu", bad)
