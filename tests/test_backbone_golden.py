"""Backbone and head parity with the official CheXFound PyTorch code (golden outputs)."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_HEADS, TINY_TEACHER, golden, model_from_params

from chexfound_jax.convert import pytorch, torch_io
from chexfound_jax.models.heads import DINOHead

CASES = ["img512", "rand224", "rand144", "img512x448"]
OUTPUTS = ["x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"]


@pytest.fixture(scope="module")
def tiny():
    cfg, params = pytorch.import_state_dict(torch_io.read_checkpoint(TINY_TEACHER), num_heads=TINY_HEADS)
    return cfg, params


@pytest.fixture(scope="module")
def backbone(tiny):
    cfg, params = tiny
    return model_from_params(cfg.backbone, params["backbone"])


@pytest.fixture(scope="module")
def gold():
    return golden("backbone")


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("case", CASES)
def test_forward_features_match_official(backbone, gold, case):
    out = nnx.jit(lambda m, x: m.forward_features(x))(backbone, _nhwc(gold[f"{case}_input"]))
    for key in OUTPUTS:
        np.testing.assert_allclose(out[key], gold[f"{case}_{key}"], rtol=1e-5, atol=1e-5, err_msg=f"{case} {key}")


@pytest.mark.parametrize("case", CASES)
def test_intermediate_layers_match_official(backbone, gold, case):
    layers = backbone.get_intermediate_layers(_nhwc(gold[f"{case}_input"]), n=4)
    assert len(layers) == 4
    for i, (patch, cls) in enumerate(layers):
        np.testing.assert_allclose(patch, gold[f"{case}_inter_patch"][i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cls, gold[f"{case}_inter_cls"][i], rtol=1e-5, atol=1e-5)
    # The deepest entry is the forward_features output (shared final norm); one runs the blocks as a
    # scan, the other one by one, so they agree to float32 rounding, not bit for bit.
    out = backbone.forward_features(_nhwc(gold[f"{case}_input"]))
    np.testing.assert_allclose(layers[-1][0], out["x_norm_patchtokens"], atol=1e-5)


def test_mask_token_substitution_matches_official(backbone, gold):
    mask = gold["img512_masked_mask"]
    assert mask.sum() == 307
    out = backbone.forward_features(_nhwc(gold["img512_input"]), masks=mask)
    for key in OUTPUTS:
        np.testing.assert_allclose(out[key], gold[f"img512_masked_{key}"], rtol=1e-5, atol=1e-5, err_msg=key)
    unmasked = backbone.forward_features(_nhwc(gold["img512_input"]))
    assert np.abs(np.asarray(out["x_norm_clstoken"]) - np.asarray(unmasked["x_norm_clstoken"])).max() > 1e-3


def test_unbatched_shapes(backbone):
    x = np.zeros((2, 224, 160, 3), np.float32)
    out = jax.eval_shape(backbone.forward_features, x)
    assert out["x_norm_patchtokens"].shape == (2, 14 * 10, 64)
    assert out["x_prenorm"].shape == (2, 5 + 140, 64)


@pytest.mark.parametrize("name", ["dino_head", "ibot_head"])
def test_heads_match_official(tiny, name):
    cfg, params = tiny
    gold = golden("heads")
    head = nnx.eval_shape(lambda: DINOHead(cfg.heads()[name], rngs=nnx.Rngs(0)))
    state = nnx.state(head, nnx.Param)
    state.replace_by_pure_dict(params[name])
    nnx.update(head, state)
    np.testing.assert_allclose(head(gold["input"]), gold[f"{name}_output"], atol=1e-5)
    assert cfg.dino_head.bottleneck_dim == 32 and cfg.ibot_head.bottleneck_dim == 16
