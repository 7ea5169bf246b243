"""report.md and its plots for the miniature experiment (chexfound_jax.experiments.miniature)."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import jax
import numpy as np
from etils import epath
from matplotlib.figure import Figure

from chexfound_jax.eval import metrics

LOSS_TERMS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
PROBE_TITLES = {
    "linear": "Linear probe: the official logistic regression on the final-norm class token (C by 5-fold CV)",
    "linear_std": "Linear probe on [class token, mean patch token], every dimension standardised (C by 5-fold CV)",
    "glori": "GLoRI probe on the last 4 blocks (lr by 5-fold CV)",
}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "devices": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def _rows(run_dir: epath.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], float(r[key])) for r in rows if key in r]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.array([]), np.array([]))


def _save(fig: Figure, path: epath.Path) -> str:
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path.name


def plot_training(rows: list[dict], out: epath.Path) -> list[str]:
    """losses.png (each term against steps) and teacher_entropy.png (the collapse monitors of the targets)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for key in LOSS_TERMS:
        ax.plot(*_series(rows, key), label=key, lw=1)
    ax.set(xlabel="step", ylabel="loss", title="pretraining losses")
    ax.legend(fontsize=8)
    names = [_save(fig, out / "losses.png")]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for key in ("teacher_entropy", "teacher_batch_entropy"):
        ax.plot(*_series(rows, key), label=key, lw=1)
    ax.set(xlabel="step", ylabel="nats", title="teacher target entropy (per image; of the batch mean)")
    ax.legend(fontsize=8)
    names.append(_save(fig, out / "teacher_entropy.png"))
    return names


def plot_online(results: dict, out: epath.Path) -> str:
    """online.png: online kNN and ridge AUROC, and the offline linear probe of each export, against steps."""
    curve = results["knn_curve"]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    steps = [r["step"] for r in curve]
    ax.plot(steps, [float(r["knn_auroc"]) for r in curve], "o-", label="online kNN AUROC (k=20)")
    ax.plot(steps, [float(r["linear_auroc"]) for r in curve], "s-", label="online ridge AUROC")
    arms = sorted(
        (a for n, a in results["arms"].items() if n.startswith(("teacher", "random"))), key=lambda a: a["step"]
    )
    for probe, marker in (("linear", "D"), ("linear_std", "^")):
        auc = np.array([a[probe]["test_auroc"] for a in arms])
        ci = np.array([a[probe]["test_auroc_ci"] for a in arms]).T
        ax.errorbar(
            [a["step"] for a in arms],
            auc,
            yerr=np.abs(ci - auc),
            fmt=marker,
            capsize=3,
            label=f"{probe} probe (95% CI)",
        )
    ax.set(xlabel="pretraining step", ylabel="AUROC (held-out test)", title="does the teacher learn?")
    ax.legend(fontsize=8)
    return _save(fig, out / "online.png")


def plot_roc(results: dict, out: epath.Path, names: list[str]) -> str:
    """roc.png: test ROC curves of `names`, one panel per probe they all have."""
    y = np.asarray(results["test_labels"])
    probes = [p for p in PROBE_TITLES if all(p in results["arms"][n] for n in names)]
    fig = Figure(figsize=(4.8 * len(probes), 4.8))
    for i, probe in enumerate(probes):
        ax = fig.add_subplot(1, len(probes), i + 1)
        for name in names:
            scores = np.asarray(results["arms"][name][probe]["scores"])
            fpr, tpr, _ = metrics.roc_curve(y, scores)
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {metrics.auroc(y, scores):.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{probe} probe, test set")
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out / "roc.png")


def plot_crops(cfg: Any, out: epath.Path, images: int = 4) -> str:
    """crops.png: what pretraining is fed, the first batch of `cfg`'s pipeline after the photometric
    augmentation: per image its 2 global crops (iBOT-masked patches shaded red) and its local crops."""
    from chexfound_jax.data import pipeline

    layout = pipeline.train_layout(cfg, num_batch_shards=1, process_count=1)
    host = next(iter(pipeline.training_dataset(cfg, layout, process_index=0, num_workers=0)))
    batch = jax.device_get(jax.jit(lambda b: pipeline.finish_on_device(b, cfg))(host))
    b = batch["global_crops"].shape[1] // 2
    n_local = batch["local_crops"].shape[1] // b
    grid = cfg.crops.global_crops_size // cfg.model.patch_size
    images = min(images, b)
    fig = Figure(figsize=(1.6 * (2 + n_local), 1.7 * images))
    for j in range(images):
        crops = [batch["global_crops"][0, k * b + j] for k in range(2)]
        crops += [batch["local_crops"][0, k * b + j] for k in range(n_local)]
        for c, crop in enumerate(crops):
            ax = fig.add_subplot(images, 2 + n_local, j * (2 + n_local) + c + 1)
            gray = crop.mean(-1)
            ax.imshow((gray - gray.min()) / max(float(np.ptp(gray)), 1e-6), cmap="gray", vmin=0, vmax=1)
            if c < 2:
                mask = batch["masks"][0, c * b + j].reshape(grid, grid).astype(float)
                size = crop.shape[0]
                ax.imshow(np.kron(mask, np.ones((size // grid, size // grid))), cmap="Reds", alpha=0.35 * mask.max())
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_title(f"global {c}" if c < 2 else f"local {c - 2}", fontsize=8)
    return _save(fig, out / "crops.png")


def _pretrained(results: dict) -> list[str]:
    """The random initialisation and the teacher exports, by pretraining step."""
    names = [n for n in results["arms"] if n == "random_init" or n.startswith("teacher_")]
    return sorted(names, key=lambda n: results["arms"][n]["step"])


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _probe_table(probe: str, arms: list[tuple[str, dict]]) -> list[str]:
    """One probe's rows: hyper-parameter, CV and test AUROC, and the paired difference to random init."""
    param = "lr" if probe == "glori" else "C"
    lines = [
        f"| arm | pretraining step | {param} | CV AUROC | test AUROC [95% CI] | vs random init [paired 95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in arms:
        p = a[probe]
        d = p["vs_random_init"]
        test, diff = f"{p['test_auroc']:.3f}{_ci(p['test_auroc_ci'])}", f"{d['difference']:+.3f}{_ci(d['ci'])}"
        step = {"supervised": f"({a['step']} supervised)", "image_statistics": "—"}.get(name, a["step"])
        lines.append(f"| {name} | {step} | {p[param]:.3g} | {p['cv_auroc']:.3f} | {test} | {diff} |")
    return lines


def write(workdir: epath.Path, results: dict, run_dir: epath.Path, cfg: Any = None) -> epath.Path:
    """report.md with the comparison tables, the kNN curve and the plots (crops.png with the run's `cfg`)."""
    pretrained = _pretrained(results)
    arms = [(n, results["arms"][n]) for n in pretrained + sorted(set(results["arms"]) - set(pretrained))]
    final = pretrained[-1]
    plots = [*plot_training(_rows(run_dir), workdir), plot_online(results, workdir)]
    compared = ["random_init", final] if final != "random_init" else [final]
    plots.append(plot_roc(results, workdir, compared + (["supervised"] if "supervised" in results["arms"] else [])))
    if cfg is not None:
        plots.append(plot_crops(cfg, workdir))
    m, t = results["machine"], results["timings_s"]
    lines = [
        "# CheXFound in miniature: probes on held-out paediatric X-rays",
        "",
        f"{results['config']['arch']}, {results['config']['steps']} steps at batch "
        f"{results['config']['global_batch_size']}; pool {results['n_pool']} images, test {results['n_test']} "
        f"(patient split, seed {results['protocol']['split_seed']}). Machine: {m['cpu']}, {m['cores']} cores, "
        f"jax {m['jax']}. Time: prepare {t['prepare_s']:.0f} s, pretraining {t['pretrain_s']:.0f} s, probes "
        f"{t['probes_s']:.0f} s (the probes, and the supervised baseline's training).",
    ]
    for probe, title in PROBE_TITLES.items():
        lines += ["", f"### {title}", "", *_probe_table(probe, [(n, a) for n, a in arms if probe in a])]
    lines += ["", "Online evaluation during pretraining (teacher class token, pool -> test):", ""]
    lines += [
        "| step | kNN AUROC | kNN accuracy | ridge AUROC | feature std | effective rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["knn_curve"]:
        lines.append(
            f"| {r['step']} | {float(r['knn_auroc']):.3f} | {float(r['knn_accuracy']):.3f} | "
            f"{float(r['linear_auroc']):.3f} | {float(r['feature_std']):.2e} | {float(r['effective_rank']):.1f} |"
        )
    lines += ["", *(f"![{p}]({p})" for p in plots), ""]
    path = workdir / "report.md"
    path.write_text("\n".join(lines))
    return path
