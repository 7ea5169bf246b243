"""Metric logs of any job: TensorBoard events, a JSONL log, the run's config, a parameter table.

Nothing here needs TensorFlow or TensorBoard: the event files are TFRecords of `Event` protos encoded by
hand. The few fields used are stable parts of the format (the tests parse them with protobuf's own
parser), and writing them here keeps every write synchronous (a crash loses nothing written; tensorboardX
queues events to a background thread, and reaches gs:// only through google-cloud-storage) and every path
epath's (local or gs://).

Writers take `enabled` from the caller so that only process 0 of a multi-host job writes:
`MetricsWriter(workdir, enabled=jax.process_index() == 0)`.

Remote paths (gs://...) cannot be appended to, so both writers keep the whole file in memory and
rewrite the object at each flush (what TensorFlow's own GCS file system does); the default flush
interval is longer there (REMOTE_FLUSH_SECS) to bound the rewrites. Metric files stay small (tens of
MB for a full run), so this is simpler than rotating files and cheap enough.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import google_crc32c
import jax
import numpy as np
from etils import epath

REMOTE_FLUSH_SECS = 60.0

# --- scalars ---------------------------------------------------------------------------------------


def _scalar(name: str, value: Any) -> int | float:
    """A Python int or float of a scalar (Python, numpy or jax): what both writers store."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} is not a scalar: shape {arr.shape}")
    return int(arr.item()) if arr.dtype.kind in "biu" else float(arr.item())


def _scalars(scalars: Mapping[str, Any]) -> dict[str, int | float]:
    return {str(k): _scalar(k, v) for k, v in scalars.items()}


# --- append-only files, local or remote ------------------------------------------------------------


def _is_local(path: epath.PathLike) -> bool:
    return "://" not in os.fspath(path)


class _AppendFile:
    """Bytes appended to a file. Local: an open file, flushed to the OS. Remote (no append on object
    stores): all bytes kept and the object rewritten at each flush. `flush_secs` 0 flushes every write."""

    def __init__(self, path: epath.PathLike, flush_secs: float | None = None, *, rewrite: bool | None = None):
        self.path = epath.Path(path)
        self._rewrite = not _is_local(path) if rewrite is None else rewrite
        self._flush_secs = (REMOTE_FLUSH_SECS if self._rewrite else 0.0) if flush_secs is None else flush_secs
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewriting starts from what is there, so a resumed run's metrics.jsonl keeps its earlier lines.
        self._data = bytearray(self.path.read_bytes() if self._rewrite and self.path.exists() else b"")
        self._file = None if self._rewrite else open(os.fspath(self.path), "ab")
        self._dirty = False
        self._last_flush = time.monotonic()

    def write(self, data: bytes) -> None:
        if self._file is None:
            self._data += data
        else:
            self._file.write(data)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            if self._file is None:
                self.path.write_bytes(bytes(self._data))
            else:
                self._file.flush()
            self._dirty = False
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


# --- TensorBoard event files -----------------------------------------------------------------------
# TFRecord framing: uint64 length, masked crc32c of the length bytes, data, masked crc32c of the data.


def _masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord_frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc32c(length)) + data + struct.pack("<I", _masked_crc32c(data))


# -----------------------------------------------------------------------
# The protobuf wire format of the fields written (tensorflow/core/util/event.proto and
# tensorflow/core/framework/summary.proto; tensorboard/compat/proto/ holds copies):
#   message Event { double wall_time = 1; int64 step = 2;
#                   oneof what { string file_version = 3; ...; Summary summary = 5; ... } }
#   message Summary { repeated Value value = 1;
#                     message Value { string tag = 1; oneof value { float simple_value = 2; ... } } }
# A key is varint(field << 3 | wire type); wire types: 0 varint, 1 fixed64, 2 length-delimited,
# 5 fixed32; all little-endian.

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are their 10-byte two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _summary_value(tag: str, value: float) -> bytes:
    return _len_field(1, tag.encode()) + _key(2, _FIXED32) + struct.pack("<f", value)


def encode_event(
    wall_time: float, step: int, *, file_version: str | None = None, scalars: Mapping[str, float] | None = None
) -> bytes:
    """A serialized tensorflow.Event: wall_time, step, and either file_version or a Summary of scalars
    (each a simple_value, rounded to float32 as the proto stores it)."""
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
    if step:  # proto3 leaves default values out; writing step 0 would also parse, this keeps it canonical
        out += _key(2, _VARINT) + _varint(int(step))
    if file_version is not None:
        out += _len_field(3, file_version.encode())
    if scalars:
        summary = b"".join(_len_field(1, _summary_value(tag, float(v))) for tag, v in scalars.items())
        out += _len_field(5, summary)
    return out


class TensorBoardWriter:
    """Scalar summaries in `logdir/events.out.tfevents.<unix time>.<hostname>`, readable by TensorBoard.

    One Event per write_scalars call holds all its values. Local files are flushed every write by
    default (a crash loses nothing); remote ones every REMOTE_FLUSH_SECS (see the module docstring).
    """

    def __init__(self, logdir: epath.PathLike, *, flush_secs: float | None = None):
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        path, n = logdir / name, 0
        while path.exists():  # a second writer within the same second: never append to or clobber it
            n += 1
            path = logdir / f"{name}.{n}"
        self.path = path
        self._file = _AppendFile(path, flush_secs)
        self._file.write(_tfrecord_frame(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = _scalars(scalars)
        if values:
            self._file.write(_tfrecord_frame(encode_event(time.time(), step, scalars=values)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- JSONL -----------------------------------------------------------------------------------------


def _json_value(v: int | float) -> int | float | str:
    """Strict JSON has no NaN or infinities: they are written as the strings "nan", "inf" and "-inf",
    which keep the sign (null would not) and read back with float(value)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class JsonlWriter:
    """One strict JSON object per line, {"step": int, "time": unix seconds, **scalars}, appended.

    Non-finite values are strings (see _json_value), so every line parses with json.loads and any
    JSON reader (pandas.read_json(lines=True), jq) without NaN extensions. A resumed run appends, so
    steps after the last checkpoint of a failed run appear twice: readers keep the last line per step.
    """

    def __init__(self, path: epath.PathLike, *, flush_secs: float | None = None):
        self.path = epath.Path(path)
        self._file = _AppendFile(self.path, flush_secs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = _scalars(scalars)
        if {"step", "time"} & values.keys():
            raise ValueError("'step' and 'time' are reserved keys of a metrics line")
        record = {"step": int(step), "time": time.time(), **{k: _json_value(v) for k, v in values.items()}}
        self._file.write((json.dumps(record, allow_nan=False) + "\n").encode())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --- combined writer -------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """A config as plain JSON: mappings, sequences, scalars; anything else as its str()."""
    if hasattr(x, "to_dict") and callable(x.to_dict):  # ml_collections.ConfigDict
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool | int | str) or x is None:
        return x
    if isinstance(x, float):
        return _json_value(x)
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return str(x)


class MetricsWriter:
    """TensorBoard events in workdir/tensorboard, JSONL in workdir/metrics.jsonl, config in workdir/config.json.

    With enabled=False (processes other than 0) every method does nothing and no file is created.
    """

    def __init__(self, workdir: epath.PathLike, *, enabled: bool = True, flush_secs: float | None = None):
        self.workdir = epath.Path(workdir)
        self.enabled = enabled
        self._tb = self._jsonl = None
        if enabled:
            self._tb = TensorBoardWriter(self.workdir / "tensorboard", flush_secs=flush_secs)
            self._jsonl = JsonlWriter(self.workdir / "metrics.jsonl", flush_secs=flush_secs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self.enabled:
            values = _scalars(scalars)
            self._tb.write_scalars(step, values)
            self._jsonl.write_scalars(step, values)

    def write_config(self, config: Any) -> None:
        """workdir/config.json (a ConfigDict or mapping), rewritten whole: the run's settings at start."""
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(_jsonable(config), indent=2, allow_nan=False)
            (self.workdir / "config.json").write_text(text + "\n")

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- parameter overview ----------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def parameter_overview(params: Any) -> str:
    """A table of every parameter (path, shape, dtype, count) and the total count and bytes.

    Works on arrays and on jax.ShapeDtypeStruct trees (abstract_params), so it can be printed before
    anything is allocated.
    """
    rows = []
    total = total_bytes = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = np.asarray(leaf)  # a Python scalar
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        size = math.prod(shape)
        total += size
        total_bytes += size * dtype.itemsize
        rows.append((_path_str(path), str(shape), str(dtype), f"{size:,}"))
    header = ("path", "shape", "dtype", "count")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def fmt(r: tuple[str, ...]) -> str:
        return " | ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    lines = [fmt(header), rule, *(fmt(r) for r in rows), rule]
    lines.append(f"Total: {total:,} parameters in {len(rows)} arrays, {total_bytes / 2**20:,.1f} MiB")
    return "\n".join(lines)
