"""The README's main job on the bundled sample data."""

import numpy as np
from etils import epath
from helpers import DATA, golden

from chexfound_jax import run_sample


def test_sample_run_embeds_and_round_trips(tmp_path):
    features = run_sample.run(epath.Path(tmp_path), DATA)  # raises if the exported file differs
    assert [p.rsplit("/", 1)[-1] for p in features["paths"]] == [
        "cxr_png_gray8_512_nih_cxr14_00000001_000.png",
        "cxr_png_gray8_512_nih_cxr14_00027426_000.png",
    ]
    gold = golden("backbone")
    np.testing.assert_allclose(features["cls_token"][0], gold["img512_x_norm_clstoken"][0], rtol=1e-5, atol=1e-5)
    for name in ("weights/model_config.json", "features.npz", "teacher_checkpoint.pth"):
        assert (tmp_path / name).exists(), name
