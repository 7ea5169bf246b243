"""Observability of the pretraining job: TensorBoard events, a JSONL log, console progress, MFU.

Nothing here needs TensorFlow or TensorBoard: the event files are TFRecords (framing from
data_prep.writers) of `Event` protos encoded by hand, since the few fields used are stable parts of
the format and a protobuf dependency on TensorBoard's generated code is not worth adding.

Writers take `enabled` from the caller so that only process 0 of a multi-host job writes:
`MetricsWriter(workdir, enabled=jax.process_index() == 0)`.

Remote paths (gs://...) cannot be appended to, so both writers keep the whole file in memory and
rewrite the object at each flush (what TensorFlow's own GCS file system does); the default flush
interval is longer there (REMOTE_FLUSH_SECS) to bound the rewrites. Metric files stay small (tens of
MB for a full run), so this is simpler than rotating files and cheap enough.

Example (per log interval; the first tick, after the run's first step, is the baseline, so the
compilation never enters a window; the override is a config value in FLOP/s):

    peak = hardware.peak_flops(jax.devices()[0].device_kind, peak_override)  # chexfound_jax.hardware
    f = train_flops.train_flops_per_image(cfg, group_size)  # chexfound_jax.train.flops
    progress.tick(step)
    if progress.interval_step_time_s:
        scalars.update(throughput_metrics(
            batch_size, f["executed_total"], progress.interval_step_time_s, jax.device_count(), peak,
            nominal_flops_per_image=f["total"]))
    writer.write_scalars(step, scalars)
"""

from __future__ import annotations

import collections
import json
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from data_prep.writers import tfrecord_frame

REMOTE_FLUSH_SECS = 60.0

# --- throughput and MFU ----------------------------------------------------------------------------
# Peak FLOP/s per chip: chexfound_jax.hardware.peak_flops (the one table of chip figures).


def throughput_metrics(
    images_per_step: int,
    flops_per_image: float,
    step_time_s: float,
    num_devices: int,
    peak: float | None,
    *,
    nominal_flops_per_image: float | None = None,
) -> dict[str, float]:
    """{"images_per_s", "tflops_per_s_per_device", "mfu"} of one step time, and with a nominal count
    also {"tflops_per_s_per_device_nominal", "mfu_nominal"}.

    flops_per_image is what the step executes (train.flops' "executed_total": subset drop path
    skips rows), so "mfu" is the chip's real utilisation; the nominal count ("total": every row
    through every block) gives the *_nominal keys, for comparison with accountings that ignore the
    skipped rows. images_per_step is the global batch and num_devices all devices of the job, so
    the FLOP/s are per device. MFU is a fraction of `peak` (FLOP/s per device), left out when peak
    is None, so a metrics dict never carries a None.
    """
    if step_time_s <= 0 or num_devices <= 0:
        raise ValueError(f"step_time_s and num_devices must be positive, got {step_time_s}, {num_devices}")
    images_per_s = images_per_step / step_time_s
    out = {"images_per_s": images_per_s}
    counts = {"": flops_per_image}
    if nominal_flops_per_image is not None:
        counts["_nominal"] = nominal_flops_per_image
    for suffix, per_image in counts.items():
        flops_per_device = per_image * images_per_s / num_devices
        out[f"tflops_per_s_per_device{suffix}"] = flops_per_device / 1e12
        if peak:
            out[f"mfu{suffix}"] = flops_per_device / peak
    return out


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
        self._file.write(tfrecord_frame(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = _scalars(scalars)
        if values:
            self._file.write(tfrecord_frame(encode_event(time.time(), step, scalars=values)))

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


# --- console progress ------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """'1d 4h 5m', '20h 21m', '5m 3s', '42s' (whole units, truncated): ETA precision, not timing."""
    s = int(max(seconds, 0))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s % 60}s"
    return f"{s}s"


def format_progress(step: int, total_steps: int, steps_per_s: float | None, images_per_step: int | None = None) -> str:
    """'step 120/250000 (0.05%) | 3.41 steps/s, 272.8 img/s | ETA 20h 21m'; no rate yet: 'rate pending'."""
    line = f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.2f}%)"
    if not steps_per_s:
        return line + " | rate pending"
    rate = f"{steps_per_s:.3g} steps/s"
    if images_per_step:
        rate += f", {steps_per_s * images_per_step:.1f} img/s"
    return f"{line} | {rate} | ETA {format_duration(max(total_steps - step, 0) / steps_per_s)}"


class Progress:
    """Training rate over a moving window of (step, time) points, and console lines from it.

    start_step is the step the run (re)started from. Call tick(step) when `step` has finished (its
    metrics fetched: with async dispatch, earlier is only dispatch time), every step or only at log
    points. The first tick is the baseline, so the time before it (compilation, first batch) never
    enters the rate: the training loop ticks once right after the run's first step (the one that
    compiles), then at every log point, so the first log window already excludes the compilation.

    steps_per_s / step_time_s average over the last `window` tick intervals (console ETA);
    interval_step_time_s is the last interval alone (the logged throughput and MFU).
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        images_per_step: int | None = None,
        window: int = 20,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total_steps = total_steps
        self.start_step = start_step
        self.images_per_step = images_per_step
        self._clock = clock
        self._points: collections.deque[tuple[int, float]] = collections.deque(maxlen=window + 1)

    def tick(self, step: int) -> str:
        """Record that `step` has finished; return its progress line."""
        self._points.append((step, self._clock()))
        return format_progress(step, self.total_steps, self.steps_per_s, self.images_per_step)

    @property
    def steps_per_s(self) -> float | None:
        """Steps per second over the window; None before two ticks (or no time elapsed)."""
        if len(self._points) < 2:
            return None
        (s0, t0), (s1, t1) = self._points[0], self._points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    @property
    def interval_step_time_s(self) -> float | None:
        """Seconds per step between the last two ticks; None before two ticks (or no step between them)."""
        if len(self._points) < 2:
            return None
        (s0, t0), (s1, t1) = self._points[-2], self._points[-1]
        return (t1 - t0) / (s1 - s0) if t1 > t0 and s1 > s0 else None

    @property
    def steps_done(self) -> int:
        """Steps finished in this run (since start_step), as of the last tick."""
        return self._points[-1][0] - self.start_step if self._points else 0

    @property
    def step_time_s(self) -> float | None:
        rate = self.steps_per_s
        return 1 / rate if rate else None


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
