"""A learnable downstream task made from real X-rays: faint class-specific patterns pasted in.

Each image is a random square crop of one of the bundled Kermany X-rays, resized to `size`. Class
"marker_a" adds a faint checkerboard (+-30 grey levels) in one patch-aligned square, "marker_b" the same
checkerboard in another; labels are independent coin flips, so the task is multilabel with all four label
patterns. Written as PNGs with a labels.csv (path, two label columns, patient id, split) and built into
data_prep shards.
"""

from __future__ import annotations

import csv
import os
import pathlib

import numpy as np
from etils import epath
from PIL import Image

from data_prep import local_runner, writers
from data_prep import stages as prep
from data_prep.sources import get_source

KERMANY = pathlib.Path(__file__).parent / "data" / "kermany" / "images"
CLASSES = ("marker_a", "marker_b")
SPLITS = ("train", "val", "test")


def _checkerboard() -> np.ndarray:
    yy, xx = np.mgrid[0:16, 0:16]
    return ((yy // 4 + xx // 4) % 2) * 2.0 - 1.0


def make_images(n: int, *, size: int = 64, amplitude: float = 30.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) uint8 images and (n, 2) float32 labels."""
    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.open(p).convert("L")) for p in sorted(KERMANY.glob("*.png"))]
    pattern = _checkerboard()
    where = {"marker_a": (16, 16), "marker_b": (32, 32)}  # patch-aligned at 16 px patches
    images, labels = [], []
    for _ in range(n):
        src = sources[rng.integers(len(sources))]
        h, w = src.shape
        c = min(h, w)
        top, left = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
        img = Image.fromarray(src[top : top + c, left : left + c]).resize((size, size), Image.Resampling.BICUBIC)
        x = np.asarray(img, np.float32).copy()
        y = rng.random(len(CLASSES)) < 0.5
        for k, name in enumerate(CLASSES):
            if y[k]:
                r, col = where[name]
                x[r : r + 16, col : col + 16] += amplitude * pattern
        images.append(np.clip(np.round(x), 0, 255).astype(np.uint8))
        labels.append(y.astype(np.float32))
    return np.stack(images), np.stack(labels)


def write_release(root: pathlib.Path, counts: dict[str, int], *, shuffle_labels: bool = False, **kw) -> pathlib.Path:
    """PNGs + labels.csv under root; two images per patient; `shuffle_labels` permutes the labels (control)."""
    n = sum(counts.values())
    images, labels = make_images(n, **kw)
    if shuffle_labels:
        labels = labels[np.random.default_rng(123).permutation(n)]
    splits = np.repeat(list(counts), list(counts.values()))
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", *CLASSES, "patient", "split"])
        for i in range(n):
            name = f"images/syn_{i:04d}.png"
            Image.fromarray(images[i]).save(root / name)
            w.writerow([name, *(str(int(v)) for v in labels[i]), f"p{i // 2:04d}", splits[i]])
    return root


def write_two_view_release(root: pathlib.Path, counts: dict[str, int], **kw) -> pathlib.Path:
    """Studies of a PA image without the patterns and a LATERAL image carrying its study's labels' patterns.

    Only the lateral shows the labels, so a probe on the PA images alone stays at chance and a two-view
    probe must read the second view. labels.csv lists both images of a study, with the study's labels.
    """
    n = sum(counts.values())
    marked, labels = make_images(n, **kw)
    plain, _ = make_images(n, **{**kw, "seed": kw.get("seed", 0) + 1, "amplitude": 0.0})
    splits = np.repeat(list(counts), list(counts.values()))
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", *CLASSES, "patient", "study", "view", "split"])
        for i in range(n):
            for view, image in (("PA", plain[i]), ("LATERAL", marked[i])):
                name = f"images/s{i:04d}_{view.lower()}.png"
                Image.fromarray(image).save(root / name)
                w.writerow([name, *(str(int(v)) for v in labels[i]), f"p{i:04d}", f"s{i:04d}", view, splits[i]])
    return root


def build_shards(release: pathlib.Path, out: pathlib.Path, name: str = "synthetic", size: int = 64) -> epath.Path:
    """The release as a data_prep dataset dir (one split per labels.csv split; every view kept)."""
    with open(release / "labels.csv") as f:
        header = f.readline().strip().split(",")
    has = lambda column: column if column in header else None
    source = get_source(
        "folder",
        os.fspath(release),
        csv="labels.csv",
        path_column="file",
        label_columns=list(CLASSES),
        patient_column="patient",
        study_column=has("study"),
        view_column=has("view"),
        split_column="split",
        source_name=name,
        views="all",
    )
    options = prep.PrepOptions(size=size, min_size=size, records_per_shard=64, deduplicate=False)
    local_runner.run_local(source, os.fspath(out), options, workers=1, progress=False)
    return writers.dataset_dir(out, name, prep.DATASET_VERSION)


def task_config() -> dict:
    """The task spec of the synthetic dataset (its own splits, both classes)."""
    return {
        "name": "synthetic",
        "class_names": list(CLASSES),
        "splits": {s: {"shard_split": s} for s in SPLITS},
    }
