"""PyTorch <-> JAX weight conversion: exact round trips in every layout, strict key checking."""

import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import TINY_HEADS, TINY_HUB, TINY_TEACHER, random_params

from chexfound_jax.convert import ConversionError, export_state_dict, import_state_dict, torch_io
from chexfound_jax.models import ModelConfig, ViTConfig
from chexfound_jax.models import weights as weights_lib

torch = pytest.importorskip("torch")


def _equal_trees(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def teacher_file():
    return torch_io.read_checkpoint(TINY_TEACHER)


@pytest.fixture(scope="module")
def tiny(teacher_file):
    return import_state_dict(teacher_file, num_heads=TINY_HEADS)


def _mlp_model():
    """A plain-MLP, register-free, bias-free-proj backbone: exercises the other inference branches."""
    cfg = ViTConfig(
        embed_dim=32,
        depth=3,
        num_heads=2,
        patch_size=8,
        img_size=64,
        ffn_layer="mlp",
        num_register_tokens=0,
        proj_bias=False,
    )
    return cfg, random_params(cfg, seed=3)


def test_inferred_config(tiny):
    cfg, _ = tiny
    b = cfg.backbone
    assert (b.embed_dim, b.depth, b.num_heads, b.patch_size, b.img_size) == (64, 4, 4, 16, 512)
    assert (b.ffn_layer, b.hidden_dim, b.num_register_tokens, b.layerscale_init) == ("swiglufused", 176, 4, 1e-5)
    assert cfg.dino_head.out_dim == cfg.ibot_head.out_dim == 256
    assert (cfg.dino_head.bottleneck_dim, cfg.ibot_head.bottleneck_dim, cfg.dino_head.hidden_dim) == (32, 16, 128)


def test_default_heads_follow_dinov2_head_dim(teacher_file):
    cfg, _ = import_state_dict(teacher_file)
    assert cfg.backbone.num_heads == 1  # 64-d embedding / 64-d heads: pass num_heads for non-DINOv2 sizes


def test_chexfound_layout_is_the_official_file_exactly(teacher_file, tiny):
    sd = export_state_dict(*tiny, "chexfound")
    official = teacher_file["teacher"]
    assert list(sd) == list(official)  # same keys in the same (module registration) order
    for key in official:
        assert sd[key].dtype == official[key].dtype and np.array_equal(sd[key], official[key]), key


def test_hub_layout_is_the_official_file_exactly(tiny):
    hub = torch_io.read_checkpoint(TINY_HUB)
    sd = export_state_dict(*tiny, "hub")
    assert list(sd) == list(hub)
    assert all(np.array_equal(sd[k], hub[k]) for k in hub)
    cfg, params = import_state_dict(hub, num_heads=TINY_HEADS)
    assert cfg.backbone == tiny[0].backbone and _equal_trees(params["backbone"], tiny[1]["backbone"])


def test_chunked_keys_follow_block_chunks():
    cfg = ModelConfig(ViTConfig(embed_dim=32, depth=8, num_heads=2, patch_size=8, img_size=32))
    params = {"backbone": random_params(cfg.backbone)}
    keys = export_state_dict(cfg, params, "chexfound")
    assert "backbone.blocks.0.1.norm1.weight" in keys and "backbone.blocks.3.7.ls2.gamma" in keys
    assert not any(k.startswith("backbone.blocks.1.0.") for k in keys)


@pytest.mark.parametrize("layout", ["chexfound", "hub"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_import_round_trip_is_bit_exact(tmp_path, tiny, layout, suffix):
    cfg, params = tiny
    path = tmp_path / f"w{suffix}"
    sd = export_state_dict(cfg, params, layout)
    torch_io.write_checkpoint(sd, path, wrapper="teacher" if layout == "chexfound" else None)
    cfg2, params2 = import_state_dict(torch_io.read_checkpoint(path), num_heads=TINY_HEADS)
    want = params if layout == "chexfound" else {"backbone": params["backbone"]}
    assert cfg2.backbone == cfg.backbone and _equal_trees(params2, want)
    again = export_state_dict(cfg2, params2, layout)
    assert all(np.array_equal(again[k], sd[k]) for k in sd) and list(again) == list(sd)


def test_timm_round_trip(tmp_path, tiny):
    cfg, params = tiny
    timm_sd = export_state_dict(cfg, params, "timm")
    assert "mask_token" not in timm_sd and "reg_token" in timm_sd and "blocks.0.mlp.fc1.weight" in timm_sd
    assert timm_sd["pos_embed"].shape == (1, 1024, 64)
    np.testing.assert_array_equal(
        timm_sd["cls_token"], params["backbone"]["cls_token"] + params["backbone"]["pos_embed"][:, :1]
    )
    torch_io.write_checkpoint(timm_sd, tmp_path / "timm.safetensors")
    cfg2, params2 = import_state_dict(torch_io.read_checkpoint(tmp_path / "timm.safetensors"), num_heads=TINY_HEADS)
    assert cfg2.backbone == cfg.backbone
    again = export_state_dict(cfg2, params2, "timm")  # import then export: bit-exact
    assert list(again) == list(timm_sd) and all(np.array_equal(again[k], timm_sd[k]) for k in timm_sd)


def test_plain_mlp_backbone_round_trip():
    cfg, params = _mlp_model()
    for layout in ("hub", "chexfound", "timm"):
        sd = export_state_dict(ModelConfig(cfg), {"backbone": params}, layout)
        cfg2, params2 = import_state_dict(sd, num_heads=2)
        assert cfg2.backbone == cfg, layout
        if layout != "timm":
            assert _equal_trees(params2["backbone"], params), layout


def test_model_checkpoint_layout_picks_teacher_or_student(tiny):
    cfg, params = tiny
    teacher = export_state_dict(cfg, params, "chexfound")
    student = {k: v + 1 for k, v in teacher.items()}
    model = {
        **{f"teacher.{k}": v for k, v in teacher.items()},
        **{f"student.{k}": v for k, v in student.items()},
        "dino_loss.center": np.zeros((1, 256), np.float32),
        "ibot_patch_loss.center": np.zeros((1, 1, 256), np.float32),
    }
    _, from_teacher = import_state_dict({"model": model}, num_heads=TINY_HEADS)
    _, from_student = import_state_dict({"model": model}, source="student", num_heads=TINY_HEADS)
    assert _equal_trees(from_teacher, params)
    np.testing.assert_array_equal(
        from_student["dino_head"]["last_layer"]["g"], params["dino_head"]["last_layer"]["g"] + 1
    )
    with pytest.raises(ConversionError, match="'extra.thing'"):
        import_state_dict({"model": {**model, "extra.thing": np.zeros(1)}}, num_heads=TINY_HEADS)


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda sd: sd.pop("backbone.blocks.2.2.norm2.bias"),
            r"missing key 'teacher\.backbone\.blocks\.2\.2\.norm2\.bias'",
        ),
        (lambda sd: sd.pop("backbone.cls_token"), r"missing key 'teacher\.backbone\.cls_token'"),
        (lambda sd: sd.pop("dino_head.last_layer.weight_v"), r"missing key 'teacher\.dino_head\.last_layer\.weight_v'"),
        (
            lambda sd: sd.update({"backbone.blocks.1.1.attn.q_norm.weight": np.ones(16, np.float32)}),
            r"unknown key 'teacher\.backbone\.blocks\.1\.1\.attn\.q_norm\.weight'",
        ),
        (lambda sd: sd.update({"head.weight": np.ones((2, 64), np.float32)}), r"unknown key 'teacher\.head\.weight'"),
        (
            lambda sd: sd.update({"backbone.blocks.3.3.attn.qkv.weight": np.ones((192, 32), np.float32)}),
            r"key 'teacher\.backbone\.blocks\.3\.3\.attn\.qkv\.weight' has shape \(192, 32\), expected \(192, 64\)",
        ),
        (
            lambda sd: sd.update({"backbone.blocks.0.1.ls1.gamma": np.ones(64, np.float32)}),
            r"key 'teacher\.backbone\.blocks\.0\.1\.ls1\.gamma': block 1 appears in chunks 1 and 0",
        ),
        (
            lambda sd: sd.update({"backbone.pos_embed": np.ones((1, 1000, 64), np.float32)}),
            r"'teacher\.backbone\.pos_embed' has 999 patch positions, not a square grid",
        ),
    ],
)
def test_bad_state_dicts_name_the_key(teacher_file, edit, match):
    sd = dict(teacher_file["teacher"])
    edit(sd)
    with pytest.raises(ConversionError, match=match):
        import_state_dict({"teacher": sd}, num_heads=TINY_HEADS)


def test_timm_errors_use_timm_names(tiny):
    sd = export_state_dict(*tiny, "timm")
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'blocks\.1\.mlp\.fc2\.bias' \(timm layout\)"):
        import_state_dict(sd, num_heads=TINY_HEADS)


def test_non_tensor_and_unpicklable_inputs(tmp_path):
    with pytest.raises(ConversionError, match="'iteration' is a int"):
        import_state_dict({"cls_token": np.zeros((1, 1, 8)), "iteration": 3})
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ConversionError, match="weights-only"):
        torch_io.read_checkpoint(evil)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        torch_io.read_checkpoint(tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_weights_dir_round_trip(tmp_path, tiny):
    cfg, params = tiny
    weights_lib.save_weights(tmp_path / "w", cfg, params)
    cfg2, params2 = weights_lib.load_weights(tmp_path / "w")
    assert cfg2 == cfg and _equal_trees(params2, params)
    with pytest.raises(FileExistsError):
        weights_lib.save_weights(tmp_path / "w", cfg, params)
    cfg3, _ = weights_lib.load_weights(tmp_path / "w", dtype="bfloat16")
    assert cfg3.backbone.dtype == "bfloat16"


def test_cli_round_trip(tmp_path):
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "chexfound_jax.convert", *args], capture_output=True, text=True
    )
    out = tmp_path / "jax"
    r = run("--to=jax", f"--checkpoint={TINY_TEACHER}", f"--out={out}", f"--num_heads={TINY_HEADS}")
    assert r.returncode == 0, r.stderr
    r = run("--to=pytorch", f"--checkpoint={out}", f"--out={tmp_path / 'teacher_checkpoint.pth'}")
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "teacher_checkpoint.pth", weights_only=True)
    want = torch.load(TINY_TEACHER, weights_only=True)
    assert list(got) == ["teacher"] and list(got["teacher"]) == list(want["teacher"])
    assert all(torch.equal(got["teacher"][k], want["teacher"][k]) for k in want["teacher"])
    bad = tmp_path / "bad.pth"
    torch.save({"teacher": {k: v for k, v in want["teacher"].items() if "norm1.bias" not in k}}, bad)
    r = run("--to=jax", f"--checkpoint={bad}", f"--out={tmp_path / 'x'}", f"--num_heads={TINY_HEADS}")
    assert r.returncode != 0 and "missing key 'teacher.backbone.blocks.0.0.norm1.bias'" in r.stderr
