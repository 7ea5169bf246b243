"""Forward parity with timm's VisionTransformer, an independent implementation of the same model.

CheXFound's exactly equivalent timm model (vit_large_patch14_reg4_dinov2 with overrides) is a no_embed_class
ViT with 4 register tokens, packed SwiGLU (fc1 = [gate | value]) with SiLU, LayerScale and the token pool.
Weights go across with our "timm" export (strict load), and with our "hub" export through timm's own
checkpoint_filter_fn.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import IMAGES, import_timm, model_from_params
from PIL import Image

from chexfound_jax.convert import pytorch
from chexfound_jax.models.model import ModelConfig
from chexfound_jax.models.vit import ViTConfig, abstract_vit_params

torch = pytest.importorskip("torch")
timm = import_timm()
vision_transformer = timm.models.vision_transformer

CFG = ViTConfig(embed_dim=64, depth=2, num_heads=4, img_size=512)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
ATOL = 1e-5


def preprocess(path, size: int | None = None) -> np.ndarray:
    """PNG -> RGB -> [0, 1] -> ImageNet normalised, (H, W, 3) float32; optionally resized first."""
    image = Image.open(path).convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(image, np.float32) / 255.0
    return (x - MEAN) / STD


def images(size: int | None = None) -> np.ndarray:
    assert len(IMAGES) == 2
    return np.stack([preprocess(p, size) for p in IMAGES])


def _random_leaf(path: tuple, spec, rng: np.random.Generator) -> np.ndarray:
    """Random values far from the default init, so that every leaf visibly matters."""
    leaf = str(path[-1])
    shape = tuple(spec.shape)
    if leaf == "gamma":  # LayerScale: 1e-5 at init would hide the blocks
        out = rng.uniform(0.3, 1.0, shape)
    elif leaf == "scale":  # LayerNorm weight
        out = 1.0 + 0.3 * rng.standard_normal(shape)
    elif leaf == "bias":
        out = 0.2 * rng.standard_normal(shape)
    elif leaf in ("cls_token", "register_tokens", "mask_token", "pos_embed"):
        out = 0.5 * rng.standard_normal(shape)
    else:  # kernels (fan_in, ..., out): unit-variance outputs
        out = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return out.astype(np.float32)


def _map_with_path(tree: dict, fn, path: tuple = ()) -> dict:
    return {k: _map_with_path(v, fn, (*path, k)) if isinstance(v, dict) else fn((*path, k), v) for k, v in tree.items()}


@pytest.fixture(scope="module")
def params() -> dict:
    rng = np.random.default_rng(0)
    return {"backbone": _map_with_path(abstract_vit_params(CFG), lambda p, spec: _random_leaf(p, spec, rng))}


@nnx.jit
def _forward(model, x):
    return model.forward_features(x)


def forward(model, x: np.ndarray) -> dict[str, np.ndarray]:
    return jax.tree.map(np.asarray, _forward(model, x))


@pytest.fixture(scope="module")
def ours(params):
    model = model_from_params(CFG, params["backbone"])
    return lambda x: forward(model, x)


def timm_model(img_size: int):
    model = vision_transformer.VisionTransformer(
        img_size=img_size,
        patch_size=CFG.patch_size,
        embed_dim=CFG.embed_dim,
        depth=CFG.depth,
        num_heads=CFG.num_heads,
        mlp_ratio=2 * CFG.hidden_dim / CFG.embed_dim,
        mlp_layer=timm.layers.SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        init_values=1e-5,
        reg_tokens=CFG.num_register_tokens,
        no_embed_class=True,
        class_token=True,
        num_classes=0,
        global_pool="token",
    )
    return model.eval()


def to_torch(sd: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def run_timm(model, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(forward_features output, prenorm tokens captured at the final norm's input)."""
    captured = {}

    def keep_input(module, args, output) -> None:  # returns None: a forward hook's value replaces the output
        captured["prenorm"] = args[0]

    hook = model.norm.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            out = model.forward_features(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    finally:
        hook.remove()
    return out.numpy(), captured["prenorm"].numpy()


def assert_parity(ours_out: dict, timm_out: np.ndarray, timm_prenorm: np.ndarray, what: str) -> float:
    r = 1 + CFG.num_register_tokens
    normed = np.concatenate(
        [ours_out["x_norm_clstoken"][:, None], ours_out["x_norm_regtokens"], ours_out["x_norm_patchtokens"]], axis=1
    )
    assert normed.shape == timm_out.shape
    assert timm_out.shape[1] == r + ours_out["x_norm_patchtokens"].shape[1]
    np.testing.assert_allclose(normed, timm_out, rtol=0, atol=ATOL, err_msg=what)
    np.testing.assert_allclose(ours_out["x_prenorm"], timm_prenorm, rtol=0, atol=ATOL, err_msg=f"{what} prenorm")
    return float(max(np.abs(normed - timm_out).max(), np.abs(ours_out["x_prenorm"] - timm_prenorm).max()))


def test_randomised_weights_matter(params):
    """The perturbation leaves no parameter at its init value (gammas far from 1e-5, etc.)."""
    bb = params["backbone"]
    assert np.abs(bb["blocks"][0]["ls1"]["gamma"]).min() > 0.1
    assert np.abs(bb["norm"]["scale"] - 1).max() > 0.1
    assert np.abs(bb["register_tokens"]).max() > 0.5


def test_timm_export_loads_strictly(params):
    sd = pytorch.export_state_dict(ModelConfig(backbone=CFG), params, "timm")
    model = timm_model(CFG.img_size)
    expected = set(model.state_dict())
    assert set(sd) == expected, (sorted(expected - set(sd)), sorted(set(sd) - expected))
    result = model.load_state_dict(to_torch(sd), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in model.state_dict().items():
        assert tuple(value.shape) == sd[key].shape, key


def test_forward_parity_native_512(params, ours):
    x = images()
    assert x.shape == (2, 512, 512, 3)
    model = timm_model(512)
    model.load_state_dict(to_torch(pytorch.export_state_dict(ModelConfig(backbone=CFG), params, "timm")), strict=True)
    out, prenorm = run_timm(model, x)
    assert out.shape == (2, 1 + 4 + 1024, CFG.embed_dim)
    ref = ours(x)
    assert_parity(ref, out, prenorm, "512")
    # The two X-rays differ, and every output token is informative.
    assert np.abs(out[0] - out[1]).max() > 0.1


def test_forward_parity_224_with_dinov2_resampling(params, ours):
    """timm at img_size 224 with a pos_embed resampled independently by DINOv2's rule in torch;
    our model takes the 224 inputs and resamples its 512 position embedding internally."""
    sd = pytorch.export_state_dict(ModelConfig(backbone=CFG), params, "timm")
    pos = params["backbone"]["pos_embed"]  # (1, 1 + 1024, D), class position first
    assert sd["pos_embed"].shape == (1, 1024, CFG.embed_dim)
    grid = torch.from_numpy(pos[:, 1:]).double().reshape(1, 32, 32, -1).permute(0, 3, 1, 2)
    resampled = torch.nn.functional.interpolate(
        grid, scale_factor=(14.1 / 32, 14.1 / 32), mode="bicubic", align_corners=False
    )  # float64: torch's float32 bicubic alone is ~1e-5 off the exact result
    assert resampled.shape[-2:] == (14, 14)
    sd = to_torch(sd)
    sd["pos_embed"] = resampled.permute(0, 2, 3, 1).reshape(1, 196, -1).float().contiguous()
    np.testing.assert_array_equal(sd["cls_token"].numpy(), params["backbone"]["cls_token"] + pos[:, :1])

    model = timm_model(224)
    model.load_state_dict(sd, strict=True)
    x = images(224)
    out, prenorm = run_timm(model, x)
    assert out.shape == (2, 1 + 4 + 196, CFG.embed_dim)
    assert_parity(ours(x), out, prenorm, "224")

    # timm's own resampling (checkpoint_filter_fn: antialiased bicubic to the target size) differs.
    hub = pytorch.export_state_dict(ModelConfig(backbone=CFG), params, "hub")
    timm_sd = vision_transformer.checkpoint_filter_fn(to_torch(hub), model)
    assert np.abs(timm_sd["pos_embed"].numpy() - sd["pos_embed"].numpy()).max() > 0.05


def test_timm_import_export_roundtrip_is_bit_exact(params, ours):
    sd = pytorch.export_state_dict(ModelConfig(backbone=CFG), params, "timm")
    cfg, imported = pytorch.import_state_dict({k: v.copy() for k, v in sd.items()}, num_heads=CFG.num_heads)
    bb = cfg.backbone
    assert (bb.embed_dim, bb.depth, bb.num_heads, bb.img_size, bb.hidden_dim, bb.num_register_tokens) == (
        CFG.embed_dim,
        CFG.depth,
        CFG.num_heads,
        CFG.img_size,
        CFG.hidden_dim,
        CFG.num_register_tokens,
    )
    back = pytorch.export_state_dict(cfg, imported, "timm")
    assert list(back) == list(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype, key
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    # The imported model (class position folded into cls_token) computes the same function.
    x = images(224)
    out = forward(model_from_params(cfg.backbone, imported["backbone"]), x)
    ref = ours(x)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        np.testing.assert_allclose(out[key], ref[key], rtol=0, atol=ATOL, err_msg=key)


def test_hub_export_through_timm_checkpoint_filter(params, ours):
    """Our hub export, mapped by timm's own DINOv2 converter (detected by mask_token), loads
    strictly and gives the same output as our timm export."""
    hub = pytorch.export_state_dict(ModelConfig(backbone=CFG), params, "hub")
    assert "mask_token" in hub and "register_tokens" in hub and "blocks.0.mlp.w12.weight" in hub
    model = timm_model(CFG.img_size)
    filtered = vision_transformer.checkpoint_filter_fn(to_torch(hub), model)
    ours_timm = pytorch.export_state_dict(ModelConfig(backbone=CFG), params, "timm")
    assert set(filtered) == set(ours_timm)
    for key, value in filtered.items():
        np.testing.assert_array_equal(value.numpy(), ours_timm[key], err_msg=key)
    model.load_state_dict(filtered, strict=True)
    x = images()
    out, prenorm = run_timm(model, x)
    assert_parity(ours(x), out, prenorm, "hub via checkpoint_filter_fn")
