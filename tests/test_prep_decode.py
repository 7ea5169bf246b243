"""data_prep decoding and quality gates on real DICOM/PNG files (tests/data/dicom, see its SOURCES.md)."""

from __future__ import annotations

import pathlib

import numpy as np
import pydicom
import pytest
import scipy.fft
from PIL import Image
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from data_prep import decode, decode_dicom, quality

DATA = pathlib.Path(__file__).parent / "data"
DICOM = DATA / "dicom"
PNGS = sorted((DATA / "images").glob("*.png"))
VET = DICOM / "chest" / "vet_dog_thorax_lat_dx_mono1_8bit_presentation_lut_inverse_highdicom_dx_image.dcm"
PA_CHEST = sorted(p for p in (DICOM / "chest").glob("*.dcm") if p != VET)
DX_J2K = (
    DICOM / "chest" / "cxr_dx_mono2_16bit_j2k_lossless_pixel_sign_plus1_looks_inverted_gdcm_DX_J2K_0Padding_DEID.dcm"
)
RG1_J2K = DICOM / "chest" / "cxr_cr_pa_mono1_15bit_j2k_lossy_nema_RG1_J2KI.dcm"
RG1_JLS = DICOM / "chest" / "cxr_cr_pa_mono1_15bit_jpegls_nearlossless_nema_RG1_JLSN.dcm"
ACR_NEMA = DICOM / "chest" / "cxr_cr_pa_mono1_10bit_no_preamble_no_meta_implicitLE_barre_CR-MONO1-10-chest.dcm"
PART10 = DICOM / "chest" / "derived_cxr_cr_mono1_10bit_explicitLE_part10_from_CR-MONO1-10-chest.dcm"
NOISE = DICOM / "corrupt" / "corrupt_ct_jpeg_lossless_p14_bad_stream_decodes_to_garbage.dcm"
JPLY = DICOM / "negative" / "neg_cr_hip_mono2_10bit_jpeg_extended_12bit_lossy_nema_RG2_JPLY.dcm"

# Expected reason of every non-PA file with the default gates (CR/DX, chest only, shorter side >= 256).
EXPECTED_REJECTIONS = {
    VET.name: "too_small",
    "corrupt_ct_jpeg_lossless_p14_bad_stream_decodes_to_garbage.dcm": "modality",
    "corrupt_mr_pixeldata_truncated.dcm": "truncated",
    "corrupt_rtplan_truncated_no_pixeldata.dcm": "no_pixel_data",
    "neg_cr_cspine_lat_mono1_12bit_16x16_rescale_OD_pydicom_CR1.dcm": "body_part",
    "neg_cr_dental_pano_mono1_10bit_jpeg_lossless_modality_lut_seq.dcm": "body_part",
    "neg_cr_hip_mono2_10bit_jpeg_extended_12bit_lossy_nema_RG2_JPLY.dcm": "body_part",
    "neg_cr_hip_mono2_10bit_jpeg_lossless_sv1_nema_RG2_JPLL.dcm": "body_part",
    "neg_cr_tibia_mono1_10bit_j2k_lossless_nema_RG3_J2KR.dcm": "body_part",
    "neg_ct_chest_axial_signed16_j2k_lossless_toshiba.dcm": "modality",
    "neg_ct_small_128px_explicitLE.dcm": "modality",
    "neg_mg_breast_mono2_12bit_jpeg_lossless_overlay.dcm": "modality",
    "neg_mr_small_64px_explicitLE.dcm": "modality",
    "neg_mr_small_64px_rle_lossless.dcm": "modality",
    "neg_ot_testpattern_modality_lut_sequence_mlut_18.dcm": "modality",
    "neg_ot_testpattern_voi_lut_sequence_vlut_04.dcm": "modality",
}

# (row0, row1, col0, col1) fractions of the output. Checked by eye on every PA file here: the boxes
# sit inside both mid lung fields and on the mediastinum / spine column above the heart.
RIGHT_LUNG = (0.30, 0.55, 0.20, 0.32)
LEFT_LUNG = (0.30, 0.55, 0.68, 0.80)
MEDIASTINUM = (0.30, 0.55, 0.46, 0.54)
MIN_CONTRAST = 40  # uint8 levels; the smallest gap seen is 70 (RG1), an inverted image is negative


def region_mean(image: np.ndarray, box: tuple[float, float, float, float]) -> float:
    h, w = image.shape
    r0, r1, c0, c1 = box
    return float(image[int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w)].mean())


@pytest.fixture(scope="module")
def chest() -> dict[str, tuple[np.ndarray, dict]]:
    return {p.name: decode.convert_file(p, source="test") for p in PA_CHEST}


def reject_reason(fn, *args, **kwargs) -> decode.Rejected:
    with pytest.raises(decode.Rejected) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value.reason, str) and info.value.message
    return info.value


# ------------------------------------------------------------------------------------------ chest DICOM


@pytest.mark.parametrize("path", PA_CHEST, ids=lambda p: p.name[:40])
def test_pa_chest_lungs_darker_than_mediastinum(chest, path):
    image, meta = chest[path.name]
    assert image.dtype == np.uint8 and min(image.shape) == 512
    mediastinum = region_mean(image, MEDIASTINUM)
    for lung in (RIGHT_LUNG, LEFT_LUNG):
        assert region_mean(image, lung) < mediastinum - MIN_CONTRAST, meta["path"]


def test_misleading_dx_tags_follow_the_documented_rule(chest):
    """DX_J2K: MONOCHROME2 + sign +1 + window outside the pixel range -> percentile window, inverted."""
    meta = chest[DX_J2K.name][1]
    assert meta["photometric"] == "MONOCHROME2" and meta["presentation_lut_shape"] == "IDENTITY"
    assert meta["window_source"] == "percentile" and meta["stale_window"]
    assert (meta["inverted"], meta["polarity_source"]) == (True, "intensity_sign")
    # Honouring MONOCHROME2 would have given white lungs: the window misses every pixel.
    ds = decode_dicom.read_dicom(str(DX_J2K))
    values = decode_dicom.decode_pixels(ds, "dx").astype(np.float64)
    assert decode_dicom.window_coverage(values, 2725, 5310) == 0.0


@pytest.mark.parametrize(
    ("photometric", "plut", "sign", "stale", "expected"),
    [
        ("MONOCHROME1", "INVERSE", 1, False, (True, "photometric")),  # counted once (vet DX)
        ("MONOCHROME1", "", None, False, (True, "photometric")),
        ("MONOCHROME2", "INVERSE", None, False, (True, "photometric")),
        ("MONOCHROME2", "IDENTITY", 1, False, (False, "photometric")),  # sign alone is not trusted (MG file)
        ("MONOCHROME2", "IDENTITY", 1, True, (True, "intensity_sign")),  # DX_J2K
        ("MONOCHROME1", "INVERSE", -1, True, (False, "intensity_sign")),
        ("MONOCHROME2", "", None, True, (False, "photometric")),  # no sign: photometric stands
    ],
)
def test_polarity_rule(photometric, plut, sign, stale, expected):
    assert decode_dicom.display_inverted(photometric, plut, sign, stale) == expected


def test_acr_nema_without_file_meta_equals_part10_rewrite(chest):
    """The old file reads as Implicit VR LE; its re-written Part-10 twin gives the very same output."""
    (a, meta_a), (b, meta_b) = chest[ACR_NEMA.name], chest[PART10.name]
    assert meta_a["transfer_syntax"] == "1.2.840.10008.1.2"
    assert meta_a["source_pixel_sha256"] == meta_b["source_pixel_sha256"]
    assert meta_a["pixel_sha256"] == meta_b["pixel_sha256"]
    np.testing.assert_array_equal(a, b)


def test_rg1_lossy_codecs_agree(chest):
    """J2K lossy and JPEG-LS near-lossless of one image: < 1 % of the range apart after to_output."""
    a, b = chest[RG1_J2K.name][0], chest[RG1_JLS.name][0]
    assert a.shape == b.shape == (544, 512)
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 0.01 * 255


def test_output_sizes_dtypes_and_aspect():
    decoded = decode.decode_dicom(RG1_J2K)
    rows, cols = decoded.metadata["original_size"]
    assert (rows, cols) == (1955, 1841) == decoded.pixels.shape
    assert decoded.pixels.dtype == np.float32 and 0 <= decoded.pixels.min() <= decoded.pixels.max() <= 1
    for dtype, size in (("uint8", 512), ("uint16", 512), ("uint16", 256)):
        out = decode.to_output(decoded, size=size, dtype=dtype)
        assert out.dtype == np.dtype(dtype) and min(out.shape) == size
        assert abs(out.shape[0] / out.shape[1] - rows / cols) < 1 / size
    wide = decode.decode_dicom(VET, min_size=0)
    assert decode.to_output(wide).shape == (512, 639)  # 169 x 211
    out8, out16 = decode.to_output(decoded), decode.to_output(decoded, dtype="uint16")
    assert out16.max() > 255 and np.abs(out16 / 257.0 - out8).max() <= 1
    with pytest.raises(ValueError):
        decode.to_output(decoded, dtype="float32")


def test_metadata_fields_and_stable_sha(chest):
    image, meta = chest[PA_CHEST[0].name]
    for key in (
        "source", "path", "patient_id", "study_id", "image_id", "view_position", "photometric",
        "bits_stored", "original_size", "pixel_spacing", "pixel_sha256", "phash", "window", "inverted",
    ):  # fmt: skip
        assert key in meta, key
    assert set(decode.METADATA_KEYS) <= set(meta)
    assert set(decode.decode_image(PNGS[0]).metadata) == set(decode.METADATA_KEYS)
    assert meta["source"] == "test" and meta["path"].endswith(PA_CHEST[0].name)
    assert meta["pixel_sha256"] == quality.pixel_sha256(image)
    _, meta2 = decode.convert_file(PA_CHEST[0], source="test")
    assert meta2["pixel_sha256"] == meta["pixel_sha256"]
    rg1 = chest[RG1_J2K.name][1]
    assert (rg1["view_position"], rg1["bits_stored"], rg1["pixel_spacing"]) == ("PA", 15, None)  # spacing 0\0
    dx = chest[DX_J2K.name][1]
    assert dx["pixel_spacing"] == (0.4, 0.4) and dx["image_id"]  # from ImagerPixelSpacing


def test_vet_dx_policy():
    """Valid DX thorax (dog): decodes with one inversion (air dark), dropped by the size gate by default."""
    assert reject_reason(decode.decode_dicom, VET).reason == "too_small"
    decoded = decode.decode_dicom(VET, min_size=0)
    meta = decoded.metadata
    assert (meta["photometric"], meta["presentation_lut_shape"]) == ("MONOCHROME1", "INVERSE")
    assert (meta["inverted"], meta["window_source"]) == (True, "header")
    out = decode.to_output(decoded)
    air, spine = region_mean(out, (0.93, 1.0, 0.0, 1.0)), region_mean(out, (0.22, 0.30, 0.3, 0.7))
    assert air < 40 < 100 < spine


# ------------------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize("name", sorted(EXPECTED_REJECTIONS), ids=lambda n: n[:40])
def test_negative_and_corrupt_files_rejected(name):
    (path,) = DICOM.glob(f"*/{name}")  # one file of that name
    error = reject_reason(decode.decode_dicom, path)
    assert error.reason == EXPECTED_REJECTIONS[name]
    assert name in error.message


def test_jpeg_extended_12bit_is_a_decode_error():
    """RG2_JPLY fails the anatomy gate first (HIP); with that gate off no installed decoder reads it."""
    assert reject_reason(decode.decode_dicom, JPLY, chest_only=False).reason == "decode_error"


def test_noise_gate_on_garbage_decode():
    error = reject_reason(decode.decode_dicom, NOISE, allowed_modalities=("CR", "DX", "CT"))
    assert error.reason == "noise" and NOISE.name in error.message
    ds = decode_dicom.read_dicom(str(NOISE))
    garbage = decode_dicom.decode_pixels(ds, "noise")
    assert garbage.min() == -32768 and garbage.max() == 32767
    assert quality.is_noise(garbage)
    assert quality.neighbour_correlation(np.random.default_rng(0).normal(size=(256, 256))) < 0.05


def test_other_modalities_decode_when_allowed():
    """Modality LUT / VOI LUT sequences and a signed CT read fine once the gates allow them."""
    ct = decode.decode_dicom(
        DICOM / "negative" / "neg_ct_small_128px_explicitLE.dcm", allowed_modalities=None, min_size=0
    )
    assert ct.pixels.shape == (128, 128) and not ct.metadata["inverted"]
    vlut = decode.decode_dicom(
        DICOM / "negative" / "neg_ot_testpattern_voi_lut_sequence_vlut_04.dcm", allowed_modalities=None
    )
    assert vlut.metadata["window_source"] == "voi_lut_sequence" and vlut.pixels.max() == 1.0
    dental = decode.decode_dicom(
        DICOM / "negative" / "neg_cr_dental_pano_mono1_10bit_jpeg_lossless_modality_lut_seq.dcm", chest_only=False
    )
    assert dental.pixels.shape == (1576, 1976) and dental.metadata["inverted"]
    cspine = decode.decode_dicom(
        DICOM / "negative" / "neg_cr_cspine_lat_mono1_12bit_16x16_rescale_OD_pydicom_CR1.dcm",
        chest_only=False,
        min_size=0,
    )
    assert cspine.metadata["window_source"] == "header"  # 1600/2800 on 0.684 x + 200


def test_truncated_and_garbage_bytes():
    whole = PART10.read_bytes()
    assert reject_reason(decode.decode_dicom, whole[: len(whole) // 2]).reason == "truncated"  # native
    j2k = RG1_J2K.read_bytes()
    assert reject_reason(decode.decode_dicom, j2k[: len(j2k) // 2]).reason == "truncated"  # encapsulated
    for junk in (b"", b"\0" * 300, b"not a dicom file " * 20):
        assert reject_reason(decode.decode_dicom, junk, name="junk.dcm").reason == "unreadable"
    assert decode.decode_dicom(whole, name="part10.dcm").metadata["path"] == "part10.dcm"


def test_explicit_vr_without_file_meta():
    """A bare Explicit VR LE dataset (no preamble, no File Meta) is read with the encoding pydicom detects."""
    ds = pydicom.dcmread(PART10)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    decoded = decode.decode_dicom(fp.getvalue(), name="bare.dcm")
    assert decoded.metadata["transfer_syntax"] == "1.2.840.10008.1.2.1"
    np.testing.assert_array_equal(decoded.pixels, decode.decode_dicom(PART10).pixels)


# ------------------------------------------------------------------------------------------ PNG / JPEG


def test_gray8_pngs():
    for png in PNGS:
        decoded = decode.decode_image(png, source="nih")
        assert decoded.metadata["bits_stored"] == 8 and decoded.metadata["format"] == "png"
        out = decode.to_output(decoded)
        assert out.shape == (512, 512)
        np.testing.assert_array_equal(out, np.asarray(Image.open(png)))  # 512 -> 512: untouched


def test_png_16bit_and_equal_rgb(tmp_path):
    gray = np.asarray(Image.open(PNGS[0]))
    reference = decode.to_output(decode.decode_image(PNGS[0]))
    path16 = tmp_path / "x12in16.png"
    Image.fromarray(gray.astype(np.uint16) * 16 + 8).save(path16)  # 12-bit data in a 16-bit PNG
    decoded16 = decode.decode_image(path16)
    assert decoded16.metadata["bits_stored"] == 12
    assert np.abs(decode.to_output(decoded16).astype(int) - reference).max() <= 1
    rgb_path = tmp_path / "rgb.png"
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(rgb_path)
    np.testing.assert_array_equal(decode.to_output(decode.decode_image(rgb_path)), reference)
    tinted = np.stack([gray] * 3, axis=-1)
    tinted[100:200, 100:200, 0] = 255
    Image.fromarray(tinted).save(tmp_path / "tinted.png")
    assert reject_reason(decode.decode_image, tmp_path / "tinted.png").reason == "not_grayscale"


def test_broken_images(tmp_path):
    data = PNGS[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert reject_reason(decode.decode_image, tmp_path / "cut.png").reason in ("truncated", "unreadable")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    assert reject_reason(decode.decode_image, tmp_path / "junk.png").reason == "unreadable"
    Image.fromarray(np.full((300, 300), 7, np.uint8)).save(tmp_path / "flat.png")
    assert reject_reason(decode.decode_image, tmp_path / "flat.png").reason == "blank"
    Image.fromarray(np.asarray(Image.open(PNGS[0]))[:200, :300]).save(tmp_path / "small.png")
    assert reject_reason(decode.decode_image, tmp_path / "small.png").reason == "too_small"


# ------------------------------------------------------------------------------------------ dedup / batch


def near_copy(png: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A resized, lossy JPEG re-encoding of `png`."""
    path = tmp_path / f"{png.stem}_copy.jpg"
    Image.open(png).resize((460, 460), Image.Resampling.LANCZOS).save(path, quality=80)
    return path


def test_deduplicator(tmp_path, chest):
    images = {p.name: decode.to_output(decode.decode_image(p)) for p in PNGS}
    copy = decode.to_output(decode.decode_file(near_copy(PNGS[0], tmp_path)))
    first, other = images[PNGS[0].name], images[PNGS[1].name]
    dedup = quality.Deduplicator(threshold=quality.NEAR_DUPLICATE_BITS)
    assert dedup.check("a", first) is None and dedup.check("b", other) is None
    assert dedup.check("a2", first.copy()) == quality.Duplicate("a", True, 0)
    match = dedup.check("a3", copy)
    assert match is not None and match.kept_id == "a" and not match.exact
    assert match.distance <= quality.NEAR_DUPLICATE_BITS
    for name, (image, _) in chest.items():  # other real X-rays are not near copies
        assert quality.hamming(quality.perceptual_hash(first), quality.perceptual_hash(image)) > 10, name
    assert dedup.check("c", chest[RG1_J2K.name][0]) is None
    assert dedup.check("d", chest[RG1_JLS.name][0]).kept_id == "c"
    assert len(dedup) == 3


@pytest.mark.parametrize("threshold", [0, 3, 6, 12])
def test_near_duplicate_index_matches_linear_scan(threshold):
    """The banded (multi-index) lookup finds exactly what a scan over all kept hashes finds."""
    rng = np.random.default_rng(threshold)
    base = [int(h) for h in rng.integers(0, 2**63, size=40, dtype=np.int64)]
    dedup, kept = quality.Deduplicator(threshold=threshold), []
    for i in range(300):
        h = base[i % 40] ^ sum(1 << int(b) for b in rng.choice(64, size=int(rng.integers(0, 16)), replace=False))
        near = [(quality.hamming(h, k), j) for j, (_, k) in enumerate(kept) if quality.hamming(h, k) <= threshold]
        match = dedup.find(f"sha{i}", h)
        assert (match is None) == (not near)
        if match is None:
            dedup.add(str(i), f"sha{i}", h)
            kept.append((str(i), h))
        else:
            assert match.kept_id == kept[min(near)[1]][0] and match.distance == min(near)[0]


def test_hashes():
    assert quality.hamming(0b1011, 0b0110) == 3
    image = np.asarray(Image.open(PNGS[0]))
    assert quality.perceptual_hash(image) == quality.perceptual_hash(image.astype(np.uint16) * 257)
    # The definition, with scipy's orthonormal 2-D DCT-II: 32x32 box average, the 8x8 lowest frequencies,
    # each bit "above their median", first row first, most significant bit first.
    small = np.asarray(Image.fromarray(image.astype(np.float32)).resize((32, 32), Image.Resampling.BOX), np.float64)
    low = scipy.fft.dctn(small, type=2, norm="ortho")[:8, :8]
    assert quality.perceptual_hash(image) == int("".join("1" if b else "0" for b in (low > np.median(low)).ravel()), 2)
    assert quality.pixel_sha256(image) != quality.pixel_sha256(image.astype(np.uint16))
    with pytest.raises(ValueError):
        quality.Deduplicator(threshold=64)


def test_gates():
    assert quality.modality_allowed("dx", ("CR", "DX")) and not quality.modality_allowed("CT", ("CR", "DX"))
    assert quality.modality_allowed(None, None) and not quality.modality_allowed(None, ("CR",))
    assert quality.is_chest_anatomy("CHEST") and quality.is_chest_anatomy("", ["PA CHEST"])
    assert quality.is_chest_anatomy(None, [None, ""]) and not quality.is_chest_anatomy("", ["TEETH"])
    assert not quality.is_chest_anatomy("HIP", ["CHEST"]) and not quality.is_chest_anatomy("TOTAL B")
    assert quality.is_chest_anatomy("", ["RELATIONSHIP"]) and not quality.is_chest_anatomy("", ["C-SPINE LAT"])
    assert quality.is_too_small((255, 900)) and not quality.is_too_small((256, 256))


def test_batch_completes_with_an_outcome_per_file(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"garbage" * 50)
    copy = near_copy(PNGS[0], tmp_path)
    paths = [*sorted(DICOM.glob("*/*.dcm")), *PNGS, copy, junk, tmp_path / "missing.dcm"]
    outcomes = list(decode.convert_files(paths, source="test", dedup=quality.Deduplicator()))
    assert [o.path for o in outcomes] == [str(p) for p in paths]
    got = {pathlib.Path(o.path).name: o.reason for o in outcomes}
    for name, reason in EXPECTED_REJECTIONS.items():
        assert got[name] == reason, name
    assert got[PART10.name] == "duplicate" and got[RG1_JLS.name] == "near_duplicate"
    assert got[copy.name] == "near_duplicate" and got["junk.dcm"] == got["missing.dcm"] == "unreadable"
    kept = [o for o in outcomes if o.ok]
    assert sorted(pathlib.Path(o.path).name for o in kept) == sorted(
        p.name for p in [*PA_CHEST, *PNGS] if p not in (PART10, RG1_JLS)
    )
    for o in kept:
        assert o.image.dtype == np.uint8 and min(o.image.shape) == 512 and o.metadata["pixel_sha256"]
    for o in outcomes:
        assert o.ok or (o.reason and pathlib.Path(o.path).name in o.message)
