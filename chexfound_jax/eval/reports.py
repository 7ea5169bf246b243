"""Evaluation reports: results JSON, a Markdown summary, ROC/PR curves, an AUROC bar chart, and
GLoRI attention overlays (as in the official notebooks/chexfound_example.ipynb).

Plots use matplotlib's object API (Figure + Agg canvas) so no global pyplot state is touched, and
are rendered to memory before being written through etils.epath, so gs:// works like a local path.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from chexfound_jax.eval import metrics

PathLike = str | os.PathLike | epath.Path
_RESERVED = ("n_images", "classes", "macro", "undefined_classes", "bootstrap")
_WHITE = np.array([255.0, 255.0, 255.0])
_GREEN = np.array([0.0, 128.0, 0.0])  # matplotlib's "green", the end of the white->green colormap


# ---------------------------------------------------------------------------------------------- JSON


def _jsonable(obj: Any, where: str) -> Any:
    """Plain JSON values: numpy scalars/arrays unpacked, non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"value at {where!r} has type {type(obj).__name__}, which JSON cannot hold")


def write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as JSON (NaN/inf -> null, numpy values converted, sorted keys, indent 2)."""
    path = epath.Path(path)
    try:
        text = json.dumps(_jsonable(obj, "<root>"), sort_keys=True, indent=2, allow_nan=False)
    except TypeError as e:
        raise TypeError(f"{path}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


# ------------------------------------------------------------------------------------------ Markdown


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _with_ci(value: float, ci: Sequence[float] | None) -> str:
    if ci is None or not math.isfinite(value):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_summary(results: dict, *, title: str) -> str:
    """A Markdown report: run information, then a table with the macro row first and one row per class."""
    for key in ("classes", "macro"):
        if key not in results:
            raise KeyError(f"results lack the {key!r} entry written by classification_metrics")
    boot = results.get("bootstrap") or {}
    conf = boot.get("confidence", 0.95)
    ci_name = f"{100 * conf:g}% CI"
    lines = [f"# {title}", ""]
    info = {"n_images": results.get("n_images")} | {k: v for k, v in results.items() if k not in _RESERVED}
    for key, value in info.items():
        value = _jsonable(value, key)
        shown = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        lines.append(f"- **{_cell(key)}**: {_cell(shown)}")
    if boot.get("n"):
        lines.append(f"- **bootstrap**: {boot['n']} resamples of images, seed {boot.get('seed')}, percentile {ci_name}")
    else:
        lines.append("- **bootstrap**: none (no confidence intervals)")
    lines += ["", f"| class | AUROC [{ci_name}] | AP [{ci_name}] | positives | negatives |", "|---|---|---|---|---|"]
    macro = results["macro"]
    lines.append(
        f"| **macro** ({macro.get('n_classes', '?')} classes) | {_with_ci(macro['auroc'], macro.get('auroc_ci'))} "
        f"| {_with_ci(macro['ap'], macro.get('ap_ci'))} | | |"
    )
    for name, m in results["classes"].items():
        lines.append(
            f"| {_cell(name)} | {_with_ci(m['auroc'], m.get('auroc_ci'))} | {_with_ci(m['ap'], m.get('ap_ci'))} "
            f"| {m.get('positives', '')} | {m.get('negatives', '')} |"
        )
    undefined = results.get("undefined_classes") or []
    if undefined:
        lines += ["", f"Undefined (one label value only; left out of the macro means): {', '.join(undefined)}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plots


def safe_name(name: str) -> str:
    """A file-name stem from a class name: "Round(ed) Atelectasis" -> "rounded_atelectasis"."""
    stem = re.sub(r"[()\[\]{}'\"]", "", name.lower())
    stem = re.sub(r"[^a-z0-9]+", "_", stem).strip("_")
    return stem or "class"


def _safe_names(names: Sequence[str]) -> list[str]:
    """safe_name of each, with _2, _3... appended where two names would collide."""
    out, seen = [], set()
    for name in names:
        stem, i = safe_name(name), 1
        while (candidate := stem if i == 1 else f"{stem}_{i}") in seen:
            i += 1
        seen.add(candidate)
        out.append(candidate)
    return out


def _figure(width: float, height: float, dpi: int = 100) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: epath.Path) -> epath.Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def _columns(labels: Any, probs: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    y, p = (y[:, None] if y.ndim == 1 else y), (p[:, None] if p.ndim == 1 else p)
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    if y.ndim != 2 or y.shape != p.shape or len(names) != y.shape[1]:
        raise ValueError(
            f"labels {np.shape(labels)}, probs {np.shape(probs)} and {len(names)} class_names do not match"
        )
    return y, p, names


def plot_roc_pr(
    out_dir: PathLike, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> list[epath.Path]:
    """roc/<class>.png and pr/<class>.png for each class with both label values (unknown labels excluded)."""
    out_dir = epath.Path(out_dir)
    y, p, names = _columns(labels, probs, class_names)
    written = []
    for k, (name, stem) in enumerate(zip(names, _safe_names(names))):
        known = metrics.known_mask(y[:, k])
        yk, pk = y[known, k], p[known, k]
        if not (yk == 1).any() or not (yk == 0).any():
            continue
        prevalence = float(yk.mean())
        fpr, tpr, _ = metrics.roc_curve(yk, pk)
        fig = _figure(4.5, 4.5)
        ax = fig.add_subplot()
        ax.plot(fpr, tpr, lw=1.5, label=f"AUROC = {metrics.auroc(yk, pk):.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
        ax.set_title(f"{name} (n+ = {int(yk.sum())}, n- = {int((yk == 0).sum())})", fontsize=9)
        ax.legend(loc="lower right")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "roc" / f"{stem}.png"))

        precision, recall, _ = metrics.pr_curve(yk, pk)
        fig = _figure(4.5, 4.5)
        ax = fig.add_subplot()
        ap = metrics.average_precision(yk, pk)
        ax.plot(recall, precision, lw=1.5, drawstyle="steps-post", label=f"AP = {ap:.3f}")
        ax.axhline(prevalence, color="k", ls="--", lw=0.8, label=f"chance ({prevalence:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision")
        ax.set_title(f"{name} (prevalence {prevalence:.3f})", fontsize=9)
        ax.legend(loc="upper right")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "pr" / f"{stem}.png"))
    return written


def plot_auroc_bar(path: PathLike, results: dict) -> epath.Path:
    """Horizontal bars of per-class AUROC (best at the top) with CI whiskers and the macro mean."""
    if "classes" not in results:
        raise KeyError("results lack the 'classes' entry written by classification_metrics")
    rows = [(n, m["auroc"], m.get("auroc_ci")) for n, m in results["classes"].items()]
    rows = sorted((r for r in rows if r[1] is not None and math.isfinite(r[1])), key=lambda r: r[1])
    fig = _figure(6.5, 1.6 + 0.24 * max(len(rows), 1))
    ax = fig.add_subplot()
    if rows:
        values = np.array([r[1] for r in rows])
        lo = np.array([r[2][0] if r[2] and r[2][0] is not None else np.nan for r in rows], dtype=np.float64)
        hi = np.array([r[2][1] if r[2] and r[2][1] is not None else np.nan for r in rows], dtype=np.float64)
        err = np.nan_to_num(np.stack([values - lo, hi - values]).clip(min=0))
        pos = np.arange(len(rows))
        ax.barh(pos, values, xerr=err, color="tab:blue", alpha=0.8, error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.set_yticks(pos, [r[0] for r in rows], fontsize=7)
        left = min(0.5, float(np.nanmin(np.r_[values, lo]))) - 0.02
        ax.set_xlim(max(0.0, math.floor(left * 20) / 20), 1.0)
        ax.set_ylim(-0.6, len(rows) - 0.4)
    else:
        ax.text(0.5, 0.5, "no class with both label values", ha="center", va="center", transform=ax.transAxes)
    macro = results.get("macro", {}).get("auroc")
    if macro is not None and math.isfinite(macro):
        ax.axvline(macro, color="tab:red", ls="--", lw=1, label=f"macro {macro:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    conf = (results.get("bootstrap") or {}).get("confidence", 0.95)
    ax.set_xlabel(f"AUROC (whiskers: {100 * conf:g}% bootstrap CI)")
    fig.tight_layout()
    return _save(fig, epath.Path(path))


def write_report(
    out_dir: PathLike,
    results: dict,
    *,
    labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    title: str,
    plots: bool = True,
) -> dict[str, str]:
    """results.json, report.md and, with plots, auroc_bar.png and curves/{roc,pr}/<class>.png.

    Returns the paths written: "json", "markdown" and, with plots, "bar" and "curves_dir".
    class_names default to the classes of `results`, in their order.
    """
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md"}
    write_json(paths["json"], results)
    markdown = markdown_summary(results, title=title)
    if plots:
        if labels is None or probs is None:
            raise ValueError("write_report(plots=True) needs labels and probs for the ROC/PR curves")
        names = list(results["classes"]) if class_names is None else class_names
        paths["bar"] = plot_auroc_bar(out_dir / "auroc_bar.png", results)
        paths["curves_dir"] = out_dir / "curves"
        plot_roc_pr(paths["curves_dir"], labels, probs, names)
        markdown += "\n![AUROC per class](auroc_bar.png)\n\nROC and PR curves per class: `curves/roc/`, `curves/pr/`.\n"
    paths["markdown"].write_text(markdown)
    return {k: os.fspath(v) for k, v in paths.items()}


# --------------------------------------------------------------------------------- attention maps


def _bilinear_matrix(size_in: int, factor: int) -> np.ndarray:
    """(size_in * factor, size_in) weights of torch's bilinear resize with align_corners=False."""
    dst = np.arange(size_in * factor, dtype=np.float64)
    src = np.maximum((dst + 0.5) / factor - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = src - i0
    w = np.zeros((len(dst), size_in))
    np.add.at(w, (np.arange(len(dst)), i0), 1.0 - frac)
    np.add.at(w, (np.arange(len(dst)), i1), frac)
    return w


def attention_heatmap(
    attention: np.ndarray, grid: tuple[int, int], upsample: int = 16, gamma: float = 0.5
) -> np.ndarray:
    """The official notebook's heat map of one image and class: per-head bilinear x`upsample`, head mean, then **gamma.

    attention: (heads, gh * gw) row-major cross-attention weights (a single head may be given as 1-D).
    Returns (gh * upsample, gw * upsample) float32.
    """
    a = np.asarray(attention, dtype=np.float64)
    a = a[None] if a.ndim == 1 else a
    gh, gw = grid
    if a.ndim != 2 or a.shape[1] != gh * gw:
        raise ValueError(f"attention has shape {np.shape(attention)}; expected (heads, {gh} * {gw} = {gh * gw})")
    if upsample < 1:
        raise ValueError(f"upsample must be >= 1, got {upsample}")
    maps = a.reshape(-1, gh, gw)
    up = _bilinear_matrix(gh, upsample) @ maps @ _bilinear_matrix(gw, upsample).T  # separable resize
    return (np.maximum(up.mean(axis=0), 0.0) ** gamma).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend a white->green alpha colormap of `heatmap` (scaled by its max) over a uint8 image.

    At normalised heat h the colour is (1 - h) white + h green with opacity h: cold regions show the
    image untouched, the hottest are solid green. Returns (H, W, 3) uint8.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 for display, got {img.dtype}")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    heat = np.asarray(heatmap, dtype=np.float64)
    if img.ndim != 3 or img.shape[-1] != 3 or heat.shape != img.shape[:2]:
        raise ValueError(f"image {np.shape(image)} must be (H, W) or (H, W, 3) with heatmap (H, W) {heat.shape}")
    top = heat.max(initial=0.0)
    h = np.clip(heat / top, 0.0, 1.0)[..., None] if top > 0 else np.zeros((*heat.shape, 1))
    colour = (1.0 - h) * _WHITE + h * _GREEN
    out = (1.0 - h) * img + h * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_attention_overlays(
    out_dir: PathLike,
    image: np.ndarray,
    attention: np.ndarray,
    grid: tuple[int, int],
    class_names: Sequence[str],
    classes: Sequence[str | int] | None = None,
    probs: np.ndarray | None = None,
) -> list[epath.Path]:
    """One PNG per requested class (default: all): the attention overlay titled with class and probability.

    image: (H, W[, 3]) uint8 display image with H = gh * u and W = gw * u (u, the upsampling factor,
    is taken from it); attention: (heads, K, gh * gw) of that image; probs: (K,) sigmoid outputs.
    """
    out_dir = epath.Path(out_dir)
    att = np.asarray(attention)
    names = list(class_names)
    gh, gw = grid
    if att.ndim != 3 or att.shape[1] != len(names):
        raise ValueError(f"attention has shape {att.shape}; expected (heads, {len(names)} classes, {gh * gw})")
    height, width = np.shape(image)[:2]
    factor = height // gh
    if factor < 1 or (height, width) != (gh * factor, gw * factor):
        raise ValueError(f"image is {height}x{width}, not an integer multiple of the {gh}x{gw} token grid")
    prob = None if probs is None else np.asarray(probs, dtype=np.float64).reshape(-1)
    if prob is not None and prob.shape != (len(names),):
        raise ValueError(f"probs has {prob.size} values for {len(names)} classes")
    stems = _safe_names(names)
    wanted = range(len(names)) if classes is None else classes
    written = []
    for c in wanted:
        if isinstance(c, str):
            if c not in names:
                raise KeyError(f"class {c!r} is not one of class_names")
            k = names.index(c)
        else:
            k = int(c)
            if not 0 <= k < len(names):
                raise IndexError(f"class index {k} out of range for {len(names)} classes")
        heat = attention_heatmap(att[:, k], grid, upsample=factor)
        scale = max(1.0, 256 / min(height, width))  # small test images still get a readable figure
        fig = _figure(scale * width / 100, scale * height / 100 + 0.4)
        ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + 40)))
        ax.imshow(overlay(image, heat), interpolation="nearest")
        ax.set_axis_off()
        caption = names[k] if prob is None else f"{names[k]}  (p = {prob[k]:.3f})"
        fig.suptitle(caption, y=0.99, va="top", fontsize=11)
        written.append(_save(fig, out_dir / f"{stems[k]}.png"))
    return written
