"""`python -m chexfound_jax.embed`: image files -> .npz of backbone features, checked against the official code."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import IMAGES, TINY_HEADS, TINY_TEACHER, golden

from chexfound_jax import embed
from chexfound_jax.convert import pytorch, torch_io
from chexfound_jax.models import weights
from chexfound_jax.models.build import model_from_params

REPO = pathlib.Path(__file__).parent.parent
IMAGE1 = next(p for p in IMAGES if "00000001_000" in p.name)
IMAGE2 = next(p for p in IMAGES if "00027426_000" in p.name)
SHAPES = {  # tiny backbone: D=64, 4 registers, 512/16 = 32x32 patches, depth 4
    "cls_token": (64,),
    "register_tokens": (4, 64),
    "patch_tokens": (1024, 64),
    "last_blocks_cls": (4, 64),
    "last_blocks_patch": (4, 1024, 64),
}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    cfg, params = pytorch.import_state_dict(torch_io.read_checkpoint(TINY_TEACHER), num_heads=TINY_HEADS)
    return weights.save_weights(tmp_path_factory.mktemp("tiny") / "weights", cfg, params)


@pytest.fixture(scope="module")
def model(weights_dir):
    cfg, params = weights.load_weights(weights_dir)
    return model_from_params(cfg.backbone, params["backbone"])


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "chexfound_jax.embed", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli_features(weights_dir, tmp_path_factory):
    """One CLI run on [image 1, image 2, image 1] with batch size 2, so the last batch is padded."""
    out = tmp_path_factory.mktemp("embed") / "features.npz"
    paths = [IMAGE1, IMAGE2, IMAGE1]
    proc = _cli(f"--checkpoint={weights_dir}", f"--out={out}", "--batch_size=2", *paths)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        return paths, {k: f[k] for k in f.files}


def test_cli_keys_shapes_dtypes(cli_features):
    paths, feats = cli_features
    assert set(feats) == {"paths", *SHAPES}
    assert feats["paths"].tolist() == [str(p) for p in paths]
    for key, shape in SHAPES.items():
        assert feats[key].shape == (len(paths), *shape), key
        assert feats[key].dtype == np.float32, key


def test_cli_matches_official_backbone(cli_features):
    _, feats = cli_features
    gold = golden("backbone")
    assert str(gold["image_files"][0]) == IMAGE1.name
    tol = dict(rtol=1e-5, atol=1e-5)
    for row in (0, 2):  # image 1 in a full batch and in the zero-padded last batch
        np.testing.assert_allclose(feats["cls_token"][row], gold["img512_x_norm_clstoken"][0], **tol)
        np.testing.assert_allclose(feats["register_tokens"][row], gold["img512_x_norm_regtokens"][0], **tol)
        np.testing.assert_allclose(feats["patch_tokens"][row], gold["img512_x_norm_patchtokens"][0], **tol)
        np.testing.assert_allclose(feats["last_blocks_cls"][row], gold["img512_inter_cls"][:, 0], **tol)
        np.testing.assert_allclose(feats["last_blocks_patch"][row], gold["img512_inter_patch"][:, 0], **tol)
    np.testing.assert_allclose(feats["patch_tokens"][2], feats["patch_tokens"][0], atol=1e-6)
    # The deepest of the last blocks is the forward_features output.
    np.testing.assert_allclose(feats["last_blocks_patch"][:, -1], feats["patch_tokens"], atol=1e-6)
    assert np.abs(feats["cls_token"][1] - feats["cls_token"][0]).max() > 1e-3  # image 2 differs


def test_batch_padding_does_not_change_features(model):
    paths = [IMAGE1, IMAGE2, IMAGE1]  # 224: a smaller, faster input that also exercises the resize
    one = embed.embed_images(model, paths, batch_size=1, image_size=224, n_last_blocks=2)
    two = embed.embed_images(model, paths, batch_size=2, image_size=224, n_last_blocks=2)
    assert one["paths"].tolist() == [str(p) for p in paths]
    assert one["patch_tokens"].shape == (3, 14 * 14, 64) and one["last_blocks_patch"].shape == (3, 2, 196, 64)
    for key in embed.FEATURE_KEYS:
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-6, err_msg=key)


def test_cli_bad_image_fails_naming_the_file(weights_dir, tmp_path):
    bad = tmp_path / "not_an_xray.png"
    bad.write_bytes(b"this is text, not a PNG")
    out = tmp_path / "never.npz"
    proc = _cli(f"--checkpoint={weights_dir}", f"--out={out}", IMAGE1, bad)
    assert proc.returncode != 0
    assert f"embed: {bad}:" in proc.stderr
    assert not out.exists()


def test_cli_reads_the_official_pth_as_it_reads_converted_weights(cli_features, tmp_path):
    out = tmp_path / "features.npz"
    proc = _cli(f"--checkpoint={TINY_TEACHER}", f"--num_heads={TINY_HEADS}", f"--out={out}", IMAGE1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        np.testing.assert_allclose(f["cls_token"][0], cli_features[1]["cls_token"][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(f["patch_tokens"][0], cli_features[1]["patch_tokens"][0], rtol=1e-6, atol=1e-6)
