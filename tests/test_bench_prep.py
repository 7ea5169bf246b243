"""bench/prep_throughput.py smoke test, and the fast paths of the per-item transform against their
reference definitions (the computations they replaced, written out here the straightforward way)."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from absl import flags
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from bench import prep_throughput
from data_prep import decode, decode_dicom, quality, records

DATA = pathlib.Path(__file__).parent / "data"
CHEST = DATA / "dicom" / "chest"
SMALL_DICOM = CHEST / "derived_cxr_cr_mono1_10bit_explicitLE_part10_from_CR-MONO1-10-chest.dcm"  # 440 x 440
PNG = sorted((DATA / "images").glob("*.png"))[0]  # 512 x 512
# The test DICOMs whose stored pixels do not decode, and why (no installed decoder reads 12-bit JPEG Extended).
UNDECODABLE = {
    "corrupt_mr_pixeldata_truncated.dcm": "truncated",
    "corrupt_rtplan_truncated_no_pixeldata.dcm": "no_pixel_data",
    "neg_cr_hip_mono2_10bit_jpeg_extended_12bit_lossy_nema_RG2_JPLY.dcm": "decode_error",
}
ALL_DICOM = sorted((DATA / "dicom").glob("*/*.dcm"))
DECODABLE_DICOM = [p for p in ALL_DICOM if p.name not in UNDECODABLE]

# ------------------------------------------------------------------------------------------ the bench


def test_bench_main_on_small_files(capsys, tmp_path):
    fv = flags.FlagValues()
    prep_throughput.define_flags(fv)
    out = tmp_path / "prep.json"
    argv = fv(["prep_throughput", "--no_defaults", "--repeats=1", f"--out={out}", str(SMALL_DICOM), str(PNG)])
    result = prep_throughput.bench(argv[1:], fv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["categories"]) == {"uncompressed", "png"}
    assert result["settings"]["repeats"] == 1 and not result["rejected"]
    for c in result["categories"].values():
        assert c["files"] == 1 and c["floor_images_per_s"] > 0 and c["full_images_per_s"] > 0
        assert c["ratio"] == pytest.approx(c["full_images_per_s"] / c["floor_images_per_s"])
        assert set(c["stage_median_ms"]) == set(prep_throughput.STAGES)
        # Every stage does work (a read, a hash, an encode...): a stage the clock never entered would stay at 0.
        assert all(ms > 0 for ms in c["stage_median_ms"].values()), c["stage_median_ms"]
    for f in result["files"].values():
        assert len(f["floor_s"]) == len(f["full_s"]) == 1 and min(f["output_shape"]) == 512
    out = capsys.readouterr().out
    assert "| category | files | floor img/s | full img/s | ratio |" in out and "| uncompressed | 1 |" in out


def test_bench_old_flag_names_end_the_program_naming_the_new_ones():
    cmd = [sys.executable, "-m", "bench.prep_throughput", "--json=prep.json"]
    result = subprocess.run(cmd, cwd=DATA.parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == "FATAL Flags parsing error: --json was renamed --out"
    assert prep_throughput.RENAMED["compress_level"] == "png_compression"


def test_bench_categories_and_derived_inputs(tmp_path):
    names = {p.name: prep_throughput.category(p) for p in prep_throughput.DEFAULT_FILES}
    assert sorted(set(names.values())) == ["j2k", "jpeg", "jpegls", "png", "uncompressed"]
    derived = dict(prep_throughput.write_derived(tmp_path))
    dcm, png = derived["uncompressed_derived"], derived["png_derived"]
    assert prep_throughput.category(dcm) == "uncompressed" and prep_throughput.category(png) == "png"
    # The same stored pixels as the files they come from.
    j2k = prep_throughput.DEFAULT_FILES[2]
    assert (
        decode.decode_file(dcm).metadata["source_pixel_sha256"]
        == decode.decode_file(j2k).metadata["source_pixel_sha256"]
    )
    nih = pydicom.dcmread(prep_throughput.DEFAULT_FILES[0]).pixel_array
    np.testing.assert_array_equal(np.asarray(Image.open(png)), nih)


# ------------------------------------------------------------------- fast paths vs their definitions


def reference_display(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, dict]:
    """Modality LUT, VOI rule and polarity on the full array of values (no table, no histogram)."""
    values = np.asarray(apply_modality_lut(stored, ds), np.float64)
    unit, voi = decode_dicom.apply_voi_rule(values, ds)
    inverted, _ = decode_dicom.display_inverted(
        str(ds.get("PhotometricInterpretation", "")),
        str(ds.get("PresentationLUTShape", "") or ""),
        int(ds.PixelIntensityRelationshipSign) if "PixelIntensityRelationshipSign" in ds else None,
        voi["stale_window"],
    )
    return (1.0 - unit if inverted else unit).astype(np.float32), voi


def reference_correlation(pixels: np.ndarray) -> float:
    """Mean of the lag-1 Pearson correlations, from centred float64 copies."""
    x = np.asarray(pixels, np.float64)
    corrs = []
    for a, b in ((x[:, :-1], x[:, 1:]), (x[:-1, :], x[1:, :])):
        if a.size == 0:
            corrs.append(0.0)
            continue
        a, b = a - a.mean(), b - b.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        corrs.append(float((a * b).sum() / denom) if denom > 0 else 0.0)
    return float(np.mean(corrs))


@pytest.mark.parametrize("path", DECODABLE_DICOM, ids=lambda p: p.name[:40])
def test_display_table_equals_full_array_steps(path):
    """The table lookup (PixelTable) gives the very pixels and window of the per-pixel computation."""
    ds = decode_dicom.read_dicom(path)
    stored = decode_dicom.decode_pixels(ds, path.name)
    assert not quality.is_blank(stored)
    pixels, info = decode_dicom.display_pixels(stored, ds)
    want, voi = reference_display(stored, ds)
    assert pixels.dtype == np.float32 and pixels.shape == want.shape
    np.testing.assert_array_equal(pixels, want)
    assert {k: info[k] for k in voi} == voi


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_the_undecodable_test_dicoms_are_rejected(name):
    """The files the table test leaves out, each for its own reason (a new decoder would move one over)."""
    (path,) = [p for p in ALL_DICOM if p.name == name]
    with pytest.raises(decode.Rejected) as rejected:
        decode_dicom.decode_pixels(decode_dicom.read_dicom(path), name)
    assert rejected.value.reason == UNDECODABLE[name]


def _dataset(**tags) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("dtype", "tags"),
    [
        (np.uint16, {}),  # percentile window, no rescale
        (np.int16, {"RescaleSlope": -0.5, "RescaleIntercept": 100}),  # signed, decreasing rescale
        (np.uint16, {"WindowCenter": 2000, "WindowWidth": 1000, "VOILUTFunction": "SIGMOID"}),
        (np.uint16, {"WindowCenter": 90000, "WindowWidth": 10}),  # stale: outside the values
        (np.uint8, {"WindowCenter": 100, "WindowWidth": 60}),  # partly inside: coverage from counts
        (np.int8, {"PhotometricInterpretation": "MONOCHROME1"}),
    ],
)
def test_display_table_on_synthetic_pixels(dtype, tags):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    stored = rng.integers(max(info.min, -3000), min(info.max, 4000), (37, 53), endpoint=True).astype(dtype)
    ds = _dataset(**tags)
    pixels, _ = decode_dicom.display_pixels(stored, ds)
    want, _ = reference_display(stored, ds)
    np.testing.assert_array_equal(pixels, want)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 199, 200, 201, 1000, 4097])
def test_histogram_percentiles_are_bit_identical(n):
    rng = np.random.default_rng(n)
    for scale in (1.0, -0.37, 3.1e-3):
        stored = rng.integers(0, 50, n)
        values = stored * scale + 7.25
        table = np.arange(50) * scale + 7.25
        counts = np.bincount(stored, minlength=50)
        for q in [(0.5, 99.5), (0.0, 100.0), (25.0, 75.0), (49.9, 50.1)]:
            want = decode_dicom.percentile_window(values, q)
            assert decode_dicom.percentile_window(table, q, counts) == want
            assert decode_dicom.percentile_window(table, q, lambda c=counts: c) == want
        for center, width in [(20.0, 10.0), (-1e9, 1.0), (7.0, 1e9), (table[3], 2.0)]:
            want = decode_dicom.window_coverage(values, center, width)
            assert decode_dicom.window_coverage(table, center, width, counts) == want


def test_neighbour_correlation_equals_its_definition():
    rng = np.random.default_rng(0)
    cases = [
        rng.normal(size=(64, 80)),
        rng.integers(0, 65536, (50, 70)).astype(np.uint16),
        rng.integers(-32768, 32768, (33, 31)).astype(np.int16),
        (rng.random((40, 40)) * 255).astype(np.float32),
        np.arange(12, dtype=np.uint8).reshape(3, 4),
        rng.random((5, 1)),
        rng.random((1, 5)),
        np.full((9, 9), 7, np.uint16),
        np.zeros((1, 1), np.uint8),
    ]
    smooth = np.cumsum(np.cumsum(rng.integers(0, 3, (700, 400)), 0), 1).astype(np.uint16)  # > 1 block
    cases += [smooth, decode_dicom.decode_pixels(decode_dicom.read_dicom(SMALL_DICOM), "cr")]
    for x in cases:
        assert quality.neighbour_correlation(x) == pytest.approx(reference_correlation(x), abs=1e-12), x.shape
    assert quality.neighbour_correlation(np.zeros((0, 4))) == 0.0


def test_pixel_sha256_is_the_digest_of_the_bytes():
    import hashlib

    for a in (np.arange(12, dtype=">u2").reshape(3, 4), np.ones((2, 3), bool), np.zeros((0, 5), np.uint8)):
        want = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode() + a.tobytes()).hexdigest()
        assert quality.pixel_sha256(a) == want
    assert quality.pixel_sha256(np.arange(20, dtype=np.uint8).reshape(4, 5)[:, 1:]) == quality.pixel_sha256(
        np.ascontiguousarray(np.arange(20, dtype=np.uint8).reshape(4, 5)[:, 1:])
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (31, 47)])
def test_png_writer_round_trips(dtype, shape):
    rng = np.random.default_rng(1)
    top = np.iinfo(dtype).max
    for image in (rng.integers(0, top, shape, endpoint=True).astype(dtype), np.full(shape, top, dtype)):
        for data in (records.encode_png(image, "stored"), records.encode_png(image)):
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            back = records.decode_png(data)
            assert back.dtype == image.dtype
            np.testing.assert_array_equal(back, image)


def test_png_writer_on_a_radiograph_is_smaller_than_pillow_level_6():
    image, _ = decode.convert_file(PNG)
    data = records.encode_png(image)
    np.testing.assert_array_equal(records.decode_png(data), image)
    pillow = io.BytesIO()
    Image.fromarray(image).save(pillow, format="PNG", compress_level=6)
    assert len(data) < len(pillow.getvalue())
