"""Metrics writers, progress lines, parameter overview and MFU arithmetic.

Event files are read back with a parser independent of the writer: TFRecord framing with its CRCs
checked here, and the Event/Summary protos decoded by protobuf itself from messages declared
dynamically with the fields of tensorflow/core/util/event.proto and framework/summary.proto.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time

import google_crc32c
import jax
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields

from chexfound_jax import hardware
from chexfound_jax.jobs import logs, progress
from chexfound_jax.models import abstract_params
from chexfound_jax.train import flops, recipe
from configs.pretrain import tiny_cpu

# --- an independent reader -------------------------------------------------------------------------


def _event_class():
    f = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="test_event.proto", package="tensorflow", syntax="proto3")
    value = descriptor_pb2.DescriptorProto(name="Value")
    value.oneof_decl.add(name="value")
    value.field.add(name="tag", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=f.TYPE_FLOAT, label=f.LABEL_OPTIONAL, oneof_index=0)
    summary = fd.message_type.add(name="Summary")
    summary.nested_type.append(value)
    summary.field.add(
        name="value", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED, type_name=".tensorflow.Summary.Value"
    )
    event = fd.message_type.add(name="Event")
    event.oneof_decl.add(name="what")
    event.field.add(name="wall_time", number=1, type=f.TYPE_DOUBLE, label=f.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL, oneof_index=0)
    event.field.add(
        name="summary",
        number=5,
        type=f.TYPE_MESSAGE,
        label=f.LABEL_OPTIONAL,
        type_name=".tensorflow.Summary",
        oneof_index=0,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Event"))


Event = _event_class()


def _masked(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(raw: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        header = raw[pos : pos + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[pos + 8 : pos + 12])[0] == _masked(header)
        data = raw[pos + 12 : pos + 12 + n]
        assert len(data) == n
        assert struct.unpack("<I", raw[pos + 12 + n : pos + 16 + n])[0] == _masked(data)
        out.append(data)
        pos += 16 + n
    return out


def read_events(path) -> list:
    events = []
    for data in read_records(path.read_bytes()):
        e = Event()
        e.ParseFromString(data)
        assert len(unknown_fields.UnknownFieldSet(e)) == 0
        assert e.SerializeToString(deterministic=True) == data  # canonical encoding, every byte accounted for
        events.append(e)
    return events


def _f32(x: float) -> float:
    return float(np.float32(x))


# --- TensorBoard -----------------------------------------------------------------------------------


def test_tensorboard_events_read_back(tmp_path):
    t0 = time.time()
    written = [
        (0, {"loss/total": 11.25, "lr": 2e-4}),
        (10, {"loss/total": np.float32(9.3), "wd": jax.numpy.asarray(0.04), "mfu": 0.123456789}),
        (2**40, {"nan": float("nan"), "neg": -3.5, "int": 7}),
    ]
    with logs.TensorBoardWriter(tmp_path / "tb") as w:
        for step, scalars in written:
            w.write_scalars(step, scalars)
        assert read_events(w.path)[-1].step == 2**40  # flushed on every write (local default)
    (path,) = (tmp_path / "tb").iterdir()
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\.\S+", path.name)
    first, *rest = read_events(path)
    assert first.file_version == "brain.Event:2" and first.step == 0
    assert t0 <= first.wall_time <= time.time()
    assert first.WhichOneof("what") == "file_version"
    assert len(rest) == len(written)
    for e, (step, scalars) in zip(rest, written):
        assert e.step == step and e.WhichOneof("what") == "summary"
        assert [v.tag for v in e.summary.value] == list(scalars)
        for v, want in zip(e.summary.value, scalars.values()):
            want = _f32(float(want))
            assert v.simple_value == want or (math.isnan(want) and math.isnan(v.simple_value))


def test_encoder_edge_cases():
    e = Event()
    e.ParseFromString(logs.encode_event(1.5, -1, scalars={"é/ü": 1.0}))
    assert (e.wall_time, e.step, e.summary.value[0].tag) == (1.5, -1, "é/ü")


def test_second_writer_in_the_same_second_gets_its_own_file(tmp_path):
    a, b = logs.TensorBoardWriter(tmp_path), logs.TensorBoardWriter(tmp_path)
    a.close(), b.close()
    assert a.path != b.path and len(read_events(a.path)) == len(read_events(b.path)) == 1


def test_rewrite_mode_used_for_object_stores(tmp_path):
    # The gs:// path: nothing appended, the whole file rewritten at each flush (forced on a local path).
    f = logs._AppendFile(tmp_path / "x", flush_secs=3600, rewrite=True)
    f.write(b"ab")
    assert not (tmp_path / "x").exists()  # not yet flushed
    f.flush()
    f.write(b"cd")
    assert (tmp_path / "x").read_bytes() == b"ab"
    f.close()
    assert (tmp_path / "x").read_bytes() == b"abcd"
    f = logs._AppendFile(tmp_path / "x", flush_secs=0, rewrite=True)  # a resumed run keeps earlier bytes
    f.write(b"ef")
    assert (tmp_path / "x").read_bytes() == b"abcdef"
    f.close()


# --- JSONL and the combined writer -----------------------------------------------------------------


def test_metrics_writer(tmp_path):
    cfg = tiny_cpu.get_config()
    with logs.MetricsWriter(tmp_path) as w:
        w.write_config(cfg)
        w.write_scalars(1, {"loss": 2.5, "lr": np.float64(1e-3), "count": np.int32(3)})
        w.write_scalars(2, {"loss": float("nan"), "up": float("inf"), "down": -float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()

    def strict(token):
        raise ValueError(f"non-standard JSON constant {token}")

    rows = [json.loads(line, parse_constant=strict) for line in lines]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, "nan")]
    assert rows[0]["lr"] == 1e-3 and rows[0]["count"] == 3 and isinstance(rows[0]["count"], int)
    assert (rows[1]["up"], rows[1]["down"]) == ("inf", "-inf") and float(rows[1]["down"]) == -math.inf
    assert all(isinstance(r["time"], float) for r in rows)
    (tb,) = (tmp_path / "tensorboard").iterdir()
    assert [e.step for e in read_events(tb)] == [0, 1, 2]
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    with logs.MetricsWriter(tmp_path) as w:  # resumed: JSONL appended, a new event file
        w.write_scalars(3, {"loss": 1.0})
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    w = logs.MetricsWriter(tmp_path / "w", enabled=False)
    w.write_config({"a": 1})
    w.write_scalars(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "w").exists()


def test_jsonl_rejects_reserved_keys_and_arrays(tmp_path):
    w = logs.JsonlWriter(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="reserved"):
        w.write_scalars(1, {"step": 3})
    with pytest.raises(ValueError, match="not a scalar"):
        w.write_scalars(1, {"v": np.ones(2)})
    w.close()


# --- progress --------------------------------------------------------------------------------------


def test_format_progress_by_hand():
    # 249880 steps left at 3.41 steps/s: 73278.6 s = 20 h 21 min; 80 images per step: 272.8 img/s.
    line = progress.format_progress(120, 250_000, 3.41, 80)
    assert line == "step 120/250000 (0.05%) | 3.41 steps/s, 272.8 img/s | ETA 20h 21m"
    assert progress.format_progress(5, 10, None) == "step 5/10 (50.00%) | rate pending"
    assert progress.format_progress(0, 100, 0.5) == "step 0/100 (0.00%) | 0.5 steps/s | ETA 3m 20s"
    assert progress.format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 3h 4m"
    assert progress.format_duration(42.9) == "42s"


def test_progress_rate_excludes_the_first_step_and_slides():
    now = [0.0]
    p = progress.Progress(110, start_step=100, images_per_step=8, window=2, clock=lambda: now[0])
    now[0] = 60.0  # step 101 finished after a minute of compilation
    assert p.tick(101) == "step 101/110 (91.82%) | rate pending"
    now[0] = 60.5
    assert p.tick(102).endswith("| 2 steps/s, 16.0 img/s | ETA 4s")
    now[0] = 61.5
    p.tick(103)
    assert p.steps_per_s == pytest.approx(2 / 1.5)  # steps 101..103, compilation excluded
    now[0] = 61.75
    p.tick(104)  # window of 2 intervals: the 101 point has left
    assert p.steps_per_s == pytest.approx(2 / 1.25) and p.step_time_s == pytest.approx(0.625)
    assert p.steps_done == 4


def test_first_log_window_excludes_the_compiling_step():
    # As the training loop ticks: right after the run's first step (which compiled, 60 s), then at the
    # log points every 5 steps (0.5 s per step). Without the baseline after step 1 the first window
    # would be 0 -> 5 and take (60 + 4 * 0.5) / 5 = 12.4 s per step.
    now = [0.0]
    p = progress.Progress(100, start_step=0, window=20, clock=lambda: now[0])
    assert p.interval_step_time_s is None
    now[0] = 60.0
    p.tick(1)  # baseline: the end of the compiling step
    assert p.interval_step_time_s is None and p.step_time_s is None
    now[0] = 62.0
    p.tick(5)
    assert p.interval_step_time_s == pytest.approx(0.5)  # steps 2..5 only
    assert p.step_time_s == pytest.approx(0.5)
    now[0] = 64.0 + 2.5  # steps 6..10: 0.5 s each, and a 2 s pause (a checkpoint) in this window
    p.tick(10)
    assert p.interval_step_time_s == pytest.approx(4.5 / 5)  # the last window alone
    assert p.step_time_s == pytest.approx(6.5 / 9)  # the moving average over the window of ticks
    now[0] = 66.5
    p.tick(10)  # a repeated step gives no interval rather than a division by zero
    assert p.interval_step_time_s is None


# --- parameter overview ----------------------------------------------------------------------------


def _total(text: str) -> int:
    m = re.search(r"^Total: ([\d,]+) parameters in (\d+) arrays", text, re.M)
    return int(m.group(1).replace(",", ""))


def test_parameter_overview_nested_dict():
    params = {
        "a": {"kernel": np.zeros((3, 4), np.float32), "bias": np.zeros(4, np.float32)},
        "b": [np.zeros(2, np.int8)],
    }
    text = logs.parameter_overview(params)
    assert _total(text) == 12 + 4 + 2
    assert "Total: 18 parameters in 3 arrays" in text
    assert re.search(r"^a/kernel +\| \(3, 4\) +\| float32 +\| +12$", text, re.M)
    assert re.search(r"^b/0 +\| \(2,\) +\| int8 +\| +2$", text, re.M)
    assert "0.0 MiB" in text


def test_parameter_overview_abstract_model():
    params = abstract_params(recipe.model_config(tiny_cpu.get_config()))
    assert isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
    text = logs.parameter_overview(params)
    leaves = jax.tree.leaves(params)
    assert _total(text) == sum(math.prod(x.shape) for x in leaves)
    assert f"in {len(leaves)} arrays" in text
    rows = [line for line in text.splitlines() if line.startswith(("backbone/", "dino_head/", "ibot_head/"))]
    assert len(rows) == len(leaves)
    assert sum(int(r.rsplit("|", 1)[1].replace(",", "")) for r in rows) == _total(text)


# --- peak FLOP/s and MFU ---------------------------------------------------------------------------


def test_throughput_by_hand():
    # 1024 images in 2 s on 8 devices of 1e14 FLOP/s, 5e11 FLOP per image executed (7.5e11 nominal):
    # 512 img/s, 5e11 * 512 / 8 = 3.2e13 FLOP/s = 32 TFLOP/s per device, MFU 0.32; nominal 48, 0.48.
    got = flops.throughput_metrics(1024, 5e11, 2.0, 8, 1e14)
    assert got == pytest.approx({"images_per_s": 512.0, "tflops_per_s_per_device": 32.0, "mfu": 0.32})
    assert "mfu" not in flops.throughput_metrics(1024, 5e11, 2.0, 8, None)
    got = flops.throughput_metrics(1024, 5e11, 2.0, 8, 1e14, nominal_flops_per_image=7.5e11)
    assert got == pytest.approx(
        {
            "images_per_s": 512.0,
            "tflops_per_s_per_device": 32.0,
            "mfu": 0.32,
            "tflops_per_s_per_device_nominal": 48.0,
            "mfu_nominal": 0.48,
        }
    )
    got = flops.throughput_metrics(1024, 5e11, 2.0, 8, None, nominal_flops_per_image=7.5e11)
    assert set(got) == {"images_per_s", "tflops_per_s_per_device", "tflops_per_s_per_device_nominal"}
    with pytest.raises(ValueError):
        flops.throughput_metrics(1024, 5e11, 0.0, 8, None)


def test_mfu_with_the_recipe_flops():
    cfg = tiny_cpu.get_config()
    f = flops.train_flops_per_image(cfg)
    peak = hardware.peak_flops("TPU v4")
    got = flops.throughput_metrics(16, f["executed_total"], 0.5, 1, peak, nominal_flops_per_image=f["total"])
    assert got["tflops_per_s_per_device"] == pytest.approx(f["executed_total"] * 32 / 1e12)
    assert got["mfu"] == pytest.approx(f["executed_total"] * 32 / 275e12)
    assert got["mfu_nominal"] == pytest.approx(f["total"] * 32 / 275e12)
    assert got["mfu"] < got["mfu_nominal"]  # tiny_cpu keeps the paper's subset drop path
