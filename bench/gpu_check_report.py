"""The targets of bench.gpu_check and how its JSON records and judges figures: error entries, one-line results, the
target verdicts and the summary; apart from the sections (no jax here), so the verdicts can be read and tested alone."""

from __future__ import annotations

import traceback
from typing import Any

GIB = 1024**3
TARGET_MFU_PCT = 60.0  # executed-FLOP MFU of the step on one H100 ...
TARGET_BATCH = 32  # ... at >= this many images per device, which must fit ...
TARGET_HBM_BYTES = 80e9  # ... in an 80 GB H100.


# --- entries ---------------------------------------------------------------------------------------


def error_text(e: BaseException) -> str:
    """`Type: first lines of the message`, short enough for a JSON report."""
    text = str(e).strip()
    lines = text.splitlines()
    text = "\n".join(lines[:8]) + ("\n..." if len(lines) > 8 else "")
    return f"{type(e).__name__}: {text[:1500]}"


def _failed(e: BaseException) -> dict[str, Any]:
    return {"status": "error", "error": error_text(e), "traceback": traceback.format_exc()[-3000:]}


def _gib(x: float | None) -> float | None:
    return None if x is None else round(x / GIB, 3)


def _run_line(run: dict[str, Any]) -> str:
    if run.get("status") != "ok":
        return run.get("error") or run.get("status", "?")
    mfu = f", MFU {run['mfu_pct']:.1f}%" if "mfu_pct" in run else ""
    return (
        f"{run['step_ms']:.2f} ms per batch, {run['images_per_s']:.1f} images/s, {run['tflops']:.1f} TFLOP/s{mfu}"
        f" (compile {run['compile_s']:.1f} s)"
    )


def _step_line(r: dict[str, Any]) -> str:
    mfu = ""
    if "mfu_executed_pct" in r:
        mfu = f", MFU executed {r['mfu_executed_pct']:.1f}% (nominal {r['mfu_nominal_pct']:.1f}%)"
    return (
        f"batch {r['per_device_batch']}: {r['step_ms']:.1f} ms/step, {r['images_per_s_per_device']:.1f} images/s per"
        f" device, {r['tflops_executed']:.1f} TFLOP/s executed{mfu}; peak {r['peak_gib']} GiB, compile"
        f" {r['compile_s']:.0f} s{' (persistent cache hit)' if r.get('compile_cache_hit') else ''}"
    )


# --- summary ---------------------------------------------------------------------------------------


def _fit_verdict(reports: list[dict[str, Any]]) -> bool | None:
    """Does TARGET_BATCH per device fit TARGET_HBM_BYTES, from the reports (fit is monotone in the batch)?"""
    for r in reports:
        peak = (r.get("memory") or {}).get("peak")
        b = r.get("per_device_batch")
        if b is None:
            continue
        if peak is not None and b >= TARGET_BATCH and peak <= TARGET_HBM_BYTES:
            return True
        over = (peak is not None and peak > TARGET_HBM_BYTES) or (
            r.get("fits") is False and "memory" not in r and (r.get("hbm_bytes") or 0) <= TARGET_HBM_BYTES
        )
        if b <= TARGET_BATCH and over:
            return False
    return None


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    cc = result.get("compile_check") or {}
    runs = [r for r in (result.get("train_step") or {}).get("runs", []) if r.get("status") == "ok"]
    with_mfu = [r for r in runs if "mfu_executed_pct" in r]
    best = max(with_mfu, key=lambda r: r["mfu_executed_pct"]) if with_mfu else None
    at_target = [r for r in with_mfu if r["per_device_batch"] >= TARGET_BATCH]
    met = None
    if at_target:
        met = max(r["mfu_executed_pct"] for r in at_target) >= TARGET_MFU_PCT
    elif cc.get("fits_32_per_80gb") is False:
        met = False  # the target's batch does not fit at all
    return {
        "mfu_executed_target_pct": TARGET_MFU_PCT,
        "min_batch_per_device": TARGET_BATCH,
        "hbm_bytes": TARGET_HBM_BYTES,
        "fits_32_per_80gb": cc.get("fits_32_per_80gb"),
        "largest_fitting_batch": cc.get("largest_fitting_batch"),
        "best_mfu_executed_pct": best["mfu_executed_pct"] if best else None,
        "best_combo": f"{best['attention_impl']}/{best['remat']} at {best['per_device_batch']}" if best else None,
        "mfu_target_met": met,
    }


def _mark(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def summary(result: dict[str, Any]) -> list[str]:
    env, v = result.get("environment") or {}, result.get("targets") or {}
    lines = [
        f"gpu_check ({env.get('mode')}): jax {env.get('jax')} on {env.get('device_kind')} x{env.get('devices_used')},"
        f" total {result.get('total_s', 0):.0f} s",
    ]
    cc = result.get("compile_check") or {}
    if cc.get("status") == "ok":
        for r in cc.get("reports", []):
            if r.get("status") == "ok" and "memory" in r:
                lines.append(
                    f"  fit {r['per_device_batch']:>3}/device: peak {r['peak_gib']:.1f} GiB of"
                    f" {_gib(r.get('hbm_bytes'))} GiB HBM -> fits {r.get('fits')} (80 GB: {r.get('fits_80gb')})"
                )
            else:
                lines.append(f"  fit {r.get('per_device_batch')}/device: {r.get('error') or r.get('status')}")
    else:
        lines.append(f"  compile check: {cc.get('error') or cc.get('status')}")
    lines.append(f"  target: {TARGET_BATCH} per 80 GB H100 must fit -> {_mark(v.get('fits_32_per_80gb'))}")
    ts = result.get("train_step") or {}
    for r in ts.get("runs", []):
        head = f"  step {r['attention_impl']:>5}/{r['remat']:<4}"
        lines.append(f"{head}: " + (_step_line(r) if r.get("status") == "ok" else (r.get("error") or r["status"])))
    if ts.get("status") not in (None, "ok"):
        lines.append(f"  train step: {ts.get('error') or ts.get('status')}")
    best = v.get("best_mfu_executed_pct")
    best = f"best {best:.1f}% ({v.get('best_combo')})" if best is not None else "no MFU measured"
    lines.append(
        f"  target: step >= {TARGET_MFU_PCT:.0f}% MFU (executed) at >= {TARGET_BATCH} images on one H100: {best}"
        f" -> {_mark(v.get('mfu_target_met'))}"
    )
    fw = result.get("vit_forward") or {}
    for r in fw.get("runs", []):
        lines.append(
            f"  forward {fw.get('model')} {fw.get('resolution')} px bf16 x{fw.get('batch')}"
            f" {r['attention_impl']}: {_run_line(r)}"
        )
    if fw.get("status") not in (None, "ok"):
        lines.append(f"  forward: {fw.get('error') or fw.get('status')}")
    fod = result.get("finish_on_device") or {}
    if fod.get("status") == "ok":
        lines.append(
            f"  finish_on_device {fod['crops']}: {fod['ms_per_image']:.3f} ms per image ({fod['images']} images,"
            f" compile {fod['compile_s']:.1f} s)"
        )
    else:
        lines.append(f"  finish_on_device: {fod.get('error') or fod.get('status')}")
    return lines
