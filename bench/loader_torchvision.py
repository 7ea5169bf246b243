"""The torchvision side of bench.loader_throughput: DINOv2's augmentation and collate in a torch DataLoader, a file of
its own because another interpreter (--torchvision_python, with torch but not this project's packages) runs it.

    <python> bench/loader_torchvision.py OUT_JSON < SPEC_JSON

The spec (bench.loader_throughput.torchvision_spec) comes on stdin and the figures go to OUT_JSON: no flags,
so the other interpreter needs neither absl nor a command line kept in step with the bench's."""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import platform
import random
import sys
import time
from typing import Any

if __package__:
    from bench.cpu_timing import measure, plan, summarize
else:  # run as a script by the other interpreter: bench/ is on sys.path, the repository root need not be
    from cpu_timing import measure, plan, summarize

MASK_OUT_KEYS = ("masks", "mask_indices", "mask_weights", "mask_valid")

# ---------------------------------------------------------------------------------------------------
# The torchvision side: runs in the other interpreter (torch, torchvision, numpy, PIL, stdlib only).
# ---------------------------------------------------------------------------------------------------


def dino_augmentation(size: dict[str, Any]) -> Any:
    """DINOv2's DataAugmentationDINO (dinov2/data/augmentations.py), as a closure over its transforms."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC

    def gaussian_blur(p: float) -> Any:  # dinov2/data/transforms.py GaussianBlur: RandomApply with 1 - p
        return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=1 - p)

    def geometric(crop: int, scale: list[float]) -> Any:
        return T.Compose(
            [T.RandomResizedCrop(crop, scale=tuple(scale), interpolation=bicubic), T.RandomHorizontalFlip(0.5)]
        )

    geometric_global = geometric(size["global_size"], size["global_scale"])
    geometric_local = geometric(size["local_size"], size["local_scale"])
    color = T.Compose(
        [
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(0.2),
        ]
    )
    normalize = T.Compose([T.ToTensor(), T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    global1 = T.Compose([color, gaussian_blur(1.0), normalize])
    global2 = T.Compose([color, gaussian_blur(0.1), T.RandomSolarize(threshold=128, p=0.2), normalize])
    local = T.Compose([color, gaussian_blur(0.5), normalize])
    n_local = size["n_local"]

    def augment(image: Any) -> dict[str, Any]:
        c1 = global1(geometric_global(image))
        c2 = global2(geometric_global(image))
        locals_ = [local(geometric_local(image)) for _ in range(n_local)]
        return {"global_crops": [c1, c2], "global_crops_teacher": [c1, c2], "local_crops": locals_, "offsets": ()}

    return augment


class PngDataset:
    """The official dataset's path: read the file's bytes, `Image.open(...).convert("RGB")`, transform."""

    def __init__(self, files: list[str], transform: Any):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, tuple]:
        from PIL import Image

        with open(self.files[index], "rb") as f:
            data = f.read()
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB")), ()


class InfiniteSampler:
    """A fresh permutation of the records each epoch, forever (the official sharded infinite sampler)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        rng = random.Random(self.seed)
        while True:
            order = list(range(self.n))
            rng.shuffle(order)
            yield from order


def _load_masking(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("_bench_masking", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_collate(size: dict[str, Any], masking: Any) -> Any:
    """dinov2/data/collate.py collate_data_and_cast, with the mask draws of `masking.collate_masks`."""
    import numpy as np
    import torch

    def collate(samples: list) -> dict[str, Any]:
        n_global, n_local = len(samples[0][0]["global_crops"]), len(samples[0][0]["local_crops"])
        global_crops = torch.stack([s[0]["global_crops"][i] for i in range(n_global) for s in samples])
        local_crops = torch.stack([s[0]["local_crops"][i] for i in range(n_local) for s in samples])
        grid = size["grid"]
        masks = masking.collate_masks(
            np.random.default_rng(),
            len(global_crops),
            (grid, grid),
            mask_ratio=tuple(size["mask_ratio"]),
            mask_probability=size["mask_probability"],
            max_masked_tokens=size["max_masked_tokens"],
        )
        out = {k: torch.from_numpy(masks[k]) for k in MASK_OUT_KEYS}
        out["collated_global_crops"] = global_crops.to(torch.half)  # the official inputs_dtype
        out["collated_local_crops"] = local_crops.to(torch.half)
        return out

    return collate


def torchvision_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Every torchvision cell of `spec` (run by --torchvision_python); returns versions and figures."""
    import numpy as np
    import PIL
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)  # as in DataLoader workers; workers = 0 is then one core
    files = sorted(str(p) for p in pathlib.Path(spec["png_dir"]).glob("*.png"))
    masking = _load_masking(spec["masking_py"])
    cells = []
    for size in spec["sizes"]:
        dataset = PngDataset(files, dino_augmentation(size))
        for workers in spec["workers"]:
            warmup, window = plan(spec["images"], spec["batch"], workers)
            extra = {"multiprocessing_context": "fork", "persistent_workers": True} if workers else {}
            loader = DataLoader(
                dataset,
                batch_size=spec["batch"],
                sampler=InfiniteSampler(len(files), spec["seed"]),
                num_workers=workers,
                collate_fn=official_collate(size, masking),
                drop_last=True,
                **extra,
            )
            t0 = time.perf_counter()
            it = iter(loader)
            windows = measure(it, batch=spec["batch"], warmup=warmup, window_batches=window, windows=spec["repeats"])
            del it, loader
            cell = {"size": size["name"], "impl": "torchvision", "workers": workers, **summarize(windows)}
            cells.append({**cell, "cell_s": time.perf_counter() - t0})
    versions = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    return {"versions": versions, "cells": cells}


def child_main(argv: list[str], stdin: Any) -> None:
    """OUT_JSON <- the figures of the spec read from stdin."""
    if len(argv) != 2 or argv[1].startswith("-"):
        sys.exit(f"usage: {argv[0]} OUT_JSON < SPEC_JSON (run by bench/loader_throughput.py)")
    spec = json.load(stdin)
    pathlib.Path(argv[1]).write_text(json.dumps(torchvision_child(spec)))


if __name__ == "__main__":
    child_main(sys.argv, sys.stdin)
