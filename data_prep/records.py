"""The training record: one chest radiograph plus its metadata, as a TFDS-compatible tf.train.Example.

Records are serialized with tfds' own feature connectors and example serializer, so shards read back
through `tfds.data_source` as well as through grain + `decode_record`. Neither direction needs
TensorFlow: the PNG is encoded here (`encode_png`: numpy filter + zlib) and handed to tfds as bytes
(tfds would call `tf.image.encode_png` for an array), and `decode_record` parses the proto with tfds'
NumPy parser and decodes the PNG with Pillow (tfds' NumPy path cannot decode 16-bit PNGs without
OpenCV).
"""

import functools
import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import example_serializer

from data_prep import quality

IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
TEXT_FIELDS = (
    "source",
    "path",
    "patient_id",
    "study_id",
    "image_id",
    "view_position",
    "photometric",
    "sha256",
    "split",
)
INT_FIELDS = ("bits_stored", "original_height", "original_width")
FLOAT_FIELDS = ("pixel_spacing", "labels")
RECORD_KEYS = ("image", *TEXT_FIELDS, *INT_FIELDS, *FLOAT_FIELDS)
_INT32 = np.iinfo(np.int32)
PngCompression = Literal["deflate", "stored"]
PNG_COMPRESSIONS: tuple[PngCompression, ...] = ("deflate", "stored")
# Pillow's PNG modes for the two stored depths.
_PNG_MODE_DTYPE = {"L": np.dtype(np.uint8), "I;16": np.dtype(np.uint16)}


@functools.cache
def _features(dtype_name: str) -> tfds.features.FeaturesDict:
    f = tfds.features
    text = {k: f.Text() for k in TEXT_FIELDS}
    ints = {k: f.Scalar(dtype=np.int32) for k in INT_FIELDS}
    return f.FeaturesDict(
        {
            "image": f.Image(shape=(None, None, 1), dtype=np.dtype(dtype_name), encoding_format="png"),
            **text,
            **ints,
            # tf.train.Example has no float64: spacing is stored (and compared) as float32.
            "pixel_spacing": f.Tensor(shape=(None,), dtype=np.float32),
            # Per-source label order lives in the dataset metadata ("label_names"); -1 uncertain, NaN unknown.
            "labels": f.Tensor(shape=(None,), dtype=np.float32),
        }
    )


def record_features(image_dtype: Any = np.uint8) -> tfds.features.FeaturesDict:
    """The TFDS schema of a record whose image has `image_dtype` (uint8 or uint16).

    The serialized bytes do not depend on the dtype (the PNG carries its bit depth); the dtype only tells
    tfds' own decoder what to return, so a dataset's features.json must name the dtype of its images.
    """
    dtype = np.dtype(image_dtype)
    if dtype not in IMAGE_DTYPES:
        raise ValueError(f"image dtype must be uint8 or uint16, got {dtype}")
    return _features(dtype.name)


def _as_image(image: Any) -> np.ndarray:
    """The image as a native-endian (H, W) uint8/uint16 array; (H, W, 1) is accepted too."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"image must be a non-empty (H, W) or (H, W, 1) array, got shape {arr.shape}")
    if arr.dtype.newbyteorder("=") not in IMAGE_DTYPES:
        raise ValueError(f"image dtype must be uint8 or uint16, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))


def pixel_sha256(image: Any) -> str:
    """`quality.pixel_sha256` of the stored (H, W) array, the same digest the decoder and deduplicator use."""
    return quality.pixel_sha256(_as_image(image))


def encode_png(image: Any, compression: PngCompression = "deflate") -> bytes:
    """Lossless single-channel PNG (8- or 16-bit, following the dtype).

    Written here rather than by Pillow, for speed (docs/benchmarks.md, "Data preparation
    throughput"): every row gets the Paeth filter, computed for the whole image at once, and zlib
    deflates the rows with its run-length strategy (`Z_RLE`: matches at distance 1 only, then
    Huffman coding). Filtered radiograph rows hold almost no longer repeats for full LZ77 to find:
    on the 512 px outputs of the test radiographs this was as small as Pillow's adaptive filter with
    Z_RLE and, against Pillow's default (zlib level 6), 5% smaller and about 6 times faster for 8-bit
    images, 2% larger and about 3 times faster for 16-bit ones; unlike Huffman-only coding it still packs
    flat borders and backgrounds. Z_RLE does not depend on the zlib level (1-9 give the same bytes), so
    the only choice is `compression`: "deflate" (Paeth + Z_RLE) or "stored" (unfiltered rows in zlib's
    stored blocks, level 0: no compression, for when encode time matters more than disk). Any PNG
    decoder reads the result (`decode_png`: Pillow).
    """
    if compression not in PNG_COMPRESSIONS:
        raise ValueError(f"PNG compression must be one of {PNG_COMPRESSIONS}, got {compression!r}")
    arr = _as_image(image)
    height, width = arr.shape
    depth = 8 * arr.itemsize
    rows = arr.astype(">u2").view(np.uint8).reshape(height, -1) if depth == 16 else arr
    if compression == "stored":  # filter type 0 (None) before each row: filtering only helps deflate
        idat = zlib.compress(np.pad(rows, ((0, 0), (1, 0))).tobytes(), 0)
    else:
        deflate = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
        idat = deflate.compress(_paeth_rows(rows, arr.itemsize)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)  # grayscale, no interlace
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PAETH = 4  # PNG filter type byte


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _paeth_rows(rows: np.ndarray, bpp: int) -> np.ndarray:
    """(H, 1 + row bytes) uint8: each row's filter type byte (Paeth) and its filtered bytes (PNG 9.4)."""
    height, width = rows.shape
    padded = np.zeros((height + 1, width + bpp), np.int16)  # a zero row above and bpp zero bytes left
    padded[1:, bpp:] = rows
    left, up, upper_left = padded[1:, :-bpp], padded[:-1, bpp:], padded[:-1, :-bpp]
    pa, pb, pc = np.abs(up - upper_left), np.abs(left - upper_left), np.abs(left + up - 2 * upper_left)
    predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upper_left))
    out = np.empty((height, width + 1), np.uint8)
    out[:, 0] = _PAETH
    np.subtract(rows, predictor, out=out[:, 1:], casting="unsafe")  # modulo 256
    return out


def decode_png(data: bytes) -> np.ndarray:
    """(H, W) uint8 or uint16 array from an 8- or 16-bit grayscale PNG."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG" or im.mode not in _PNG_MODE_DTYPE:
            raise ValueError(f"expected an 8/16-bit grayscale PNG, got {im.format} mode {im.mode}")
        return np.asarray(im, dtype=_PNG_MODE_DTYPE[im.mode])


def _as_int32(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{key} must be an int, got {value!r}")
    if not _INT32.min <= int(value) <= _INT32.max:
        raise ValueError(f"{key}={value} does not fit int32")
    return int(value)


def _as_float32_vector(key: str, value: Any) -> np.ndarray:
    arr = np.asarray(value if value is not None else [], dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"{key} must be a 1-D float sequence, got shape {arr.shape}")
    return arr


def normalize_record(example: Mapping[str, Any]) -> dict[str, Any]:
    """Checks an example against the schema and returns it in its stored (= decoded) form.

    `sha256` may be absent or empty (it is computed); when given it must match the pixels, since it is the
    record's claim about what it stores. Text fields may be None (stored as ""); `pixel_spacing` is a
    (row, column) pair, empty or None.
    """
    missing = set(RECORD_KEYS) - set(example) - {"sha256"}
    extra = set(example) - set(RECORD_KEYS)
    if missing or extra:
        raise KeyError(f"record keys: missing {sorted(missing)}, unknown {sorted(extra)}")
    image = _as_image(example["image"])
    digest = pixel_sha256(image)
    given = example.get("sha256") or ""
    if given and given != digest:
        raise ValueError(f"sha256 {given} does not match the image pixels ({digest})")
    out: dict[str, Any] = {"image": image}
    for key in TEXT_FIELDS:
        value = digest if key == "sha256" else example[key]
        value = "" if value is None else value  # headers often lack a tag; "" is the stored "unknown"
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a str, got {value!r}")
        out[key] = value
    out.update({k: _as_int32(k, example[k]) for k in INT_FIELDS})
    out.update({k: _as_float32_vector(k, example[k]) for k in FLOAT_FIELDS})
    if out["pixel_spacing"].size not in (0, 2):
        raise ValueError(f"pixel_spacing must be a pair or empty, got {out['pixel_spacing']}")
    return out


@functools.cache
def _serializer() -> example_serializer.ExampleSerializer:
    return example_serializer.ExampleSerializer(record_features().get_serialized_info())


def encode_record(example: Mapping[str, Any], *, png_compression: PngCompression = "deflate") -> bytes:
    """Serialized tf.train.Example of one record (see `normalize_record` for what is accepted).

    The proto is serialized deterministically (sorted map keys), so equal records give equal bytes and
    rewritten shards are byte-identical.
    """
    rec = normalize_record(example)
    return serialize_record(rec, encode_png(rec["image"], png_compression))


def serialize_record(rec: Mapping[str, Any], png: bytes) -> bytes:
    """The serialized Example of a `normalize_record` output whose image is already PNG-encoded."""
    encoded = record_features(rec["image"].dtype).encode_example({**rec, "image": png})
    return _serializer().get_tf_example(encoded).SerializeToString(deterministic=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`: (H, W) image in its stored dtype, str/int fields, float32 vectors."""
    # SkipDecoding leaves the PNG bytes alone, so the feature's image dtype is irrelevant here.
    raw = record_features().deserialize_example_np(data, decoders={"image": tfds.decode.SkipDecoding()})
    out: dict[str, Any] = {"image": decode_png(raw["image"])}
    out.update({k: raw[k].decode("utf-8") for k in TEXT_FIELDS})
    out.update({k: int(raw[k]) for k in INT_FIELDS})
    out.update({k: np.asarray(raw[k], dtype=np.float32) for k in FLOAT_FIELDS})
    return out


def records_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Bit-exact equality of two records (NaN labels equal NaN; dtypes must agree)."""
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def label_vector(values: Mapping[str, float], label_names: Sequence[str]) -> np.ndarray:
    """float32 labels in the source's fixed `label_names` order; names the source leaves out are NaN."""
    unknown = set(values) - set(label_names)
    if unknown:
        raise KeyError(f"labels not in label_names: {sorted(unknown)}")
    return np.array([values.get(name, np.nan) for name in label_names], dtype=np.float32)
