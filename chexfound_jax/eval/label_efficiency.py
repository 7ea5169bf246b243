"""Label efficiency: probes trained on seeded, stratified, patient-level fractions of the training split.

Validation selects the lr and is never trained on (official eval/classification/linear_glori.py appends it), so a
fraction means what it says. Each run's results go under fraction_F/repeat_R/; the summary (mean, std,
range per fraction) to label_efficiency.json and .md. With `backbone.adapt` each run trains the backbone (or its
adapters / biases) with its head from the given weights, and keeps only its test results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from chexfound_jax.eval import reports, subsample
from chexfound_jax.eval.workflows import Environment, task_tables, test_head, train_head


def run(env: Environment, workdir: epath.Path) -> dict:
    """Probes trained on seeded, stratified, patient-level fractions of train; val selects, never trains."""
    task, tables = task_tables(env, ("train", "val", "test"))
    le = env.cfg.label_efficiency
    runs = []
    for fraction, repeat, seed in subsample.label_efficiency_runs(tuple(le.fractions), int(le.repeats), int(le.seed)):
        train = subsample.subsample(tables["train"], fraction, seed)
        out = workdir / f"fraction_{fraction:g}" / f"repeat_{repeat}"
        log: dict = {}
        head_cfg, params, rest, lr = train_head(
            env,
            train,
            tables["val"],
            task.class_names,
            refit=False,
            seed=seed,
            log=log,
            ckpt_dir=out / "checkpoints",
            run=f"fraction_{fraction:g}/repeat_{repeat}",
        )
        extra = {
            "task": task.name,
            "fraction": fraction,
            "repeat": repeat,
            "seed": seed,
            "lr": lr,
            "train_images": len(train),
            "train_patients": len(np.unique(train.patient_id)),
        }
        result = test_head(
            env,
            out,
            head_cfg,
            params,
            rest,
            tables["test"],
            task.class_names,
            title=f"{task.name}: {fraction:g} of train, repeat {repeat}",
            extra=extra,
            plots=False,
        )
        runs.append({k: result[k] for k in ("macro", *extra)})
    summary = summarize(runs)
    if env.lead:
        reports.write_json(workdir / "label_efficiency.json", {"task": task.name, "runs": runs, "summary": summary})
        (workdir / "label_efficiency.md").write_text(markdown(task.name, summary))
    return {"runs": runs, "summary": summary}


def summarize(runs: Sequence[dict]) -> list[dict]:
    """Mean, standard deviation and range of the macro test metrics per fraction."""
    out = []
    for fraction in sorted({r["fraction"] for r in runs}):
        group = [r for r in runs if r["fraction"] == fraction]
        row: dict[str, Any] = {
            "fraction": fraction,
            "runs": len(group),
            "train_images": [r["train_images"] for r in group],
        }
        for key in ("auroc", "ap"):
            values = np.asarray([r["macro"][key] for r in group], np.float64)
            row[key] = {
                "mean": float(np.nanmean(values)),
                "std": float(np.nanstd(values)),
                "min": float(np.nanmin(values)),
                "max": float(np.nanmax(values)),
                "values": values.tolist(),
            }
        out.append(row)
    return out


def markdown(task: str, summary: Sequence[dict]) -> str:
    lines = [
        f"# {task}: label efficiency (test, macro)",
        "",
        "| fraction | runs | train images | AUROC | AP |",
        "|---:|---:|---|---|---|",
    ]
    for r in summary:
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in ("auroc", "ap")]
        lines.append(
            f"| {r['fraction']:g} | {r['runs']} | {', '.join(map(str, r['train_images']))} | {' | '.join(cells)} |"
        )
    return "\n".join(lines) + "\n"
