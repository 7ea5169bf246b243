"""Classifier heads on disk and in the official PyTorch classifier checkpoints: exact round trips, strict keys."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import GLORI_CATCLS_PTH, GLORI_PTH, TINY_TEACHER, torch_glori, torch_linear_probe

from chexfound_jax.convert import ConversionError, head_checkpoints, torch_io
from chexfound_jax.models.classifiers import (
    ClassifierConfig,
    abstract_classifier_state,
    classifier_from_state,
    head_inputs,
    is_classifier_dir,
    load_classifier,
    save_classifier,
)

torch = pytest.importorskip("torch")

GOLDEN_NAME = "linear:blocks=4:avgpool=False:lr=0_0001000000"
LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]  # official grid, linear_glori.py


@pytest.fixture(scope="module")
def golden_file():
    return torch_io.read_checkpoint(GLORI_CATCLS_PTH)


@pytest.fixture(scope="module")
def golden_head(golden_file):
    return head_checkpoints.read_head_file(golden_file)[1]


def _same_tree(a, b):
    fa, ta = jax.tree.flatten(a)
    fb, tb = jax.tree.flatten(b)
    return ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))


def _random_state(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_classifier_state(cfg))


# --- names --------------------------------------------------------------------------------------


def test_head_names():
    assert head_checkpoints.head_name(1e-4) == GOLDEN_NAME
    assert head_checkpoints.head_name(0.1, n_blocks=1, avgpool=True) == "linear:blocks=1:avgpool=True:lr=0_1000000000"
    for lr in LRS:
        assert head_checkpoints.parse_head_name(head_checkpoints.head_name(lr, 4, False)) == {
            "n_blocks": 4,
            "avgpool": False,
            "lr": lr,
        }
    assert len({head_checkpoints.head_name(lr) for lr in LRS}) == 13
    with pytest.raises(ConversionError, match="'linear:blocks=4:lr=0_1'"):
        head_checkpoints.parse_head_name("linear:blocks=4:lr=0_1")


# --- official files -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [GLORI_PTH, GLORI_CATCLS_PTH])
def test_official_file_round_trips_exactly(path):
    obj = torch_io.read_checkpoint(path)
    name, sd = head_checkpoints.read_head_file(obj)
    assert name == GOLDEN_NAME
    cfg, state = head_checkpoints.import_classifier(sd)
    out = head_checkpoints.head_file(head_checkpoints.head_name(1e-4), head_checkpoints.export_classifier(cfg, state))
    assert list(out) == list(obj) and out["iteration"] == obj["iteration"] == 0
    assert list(out["model"]) == list(obj["model"])  # same keys in the official (registration) order
    assert all(np.array_equal(out["model"][k], v) and out["model"][k].dtype == v.dtype for k, v in obj["model"].items())


def test_bare_decoder_dict_is_accepted(golden_head):
    cfg, state = head_checkpoints.import_classifier(golden_head)
    bare = {k.removeprefix("decoder."): v for k, v in golden_head.items()}
    cfg2, state2 = head_checkpoints.import_classifier(bare)
    assert cfg2 == cfg and _same_tree(state2, state)
    del bare["layers.0.norm2.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'layers\.0\.norm2\.bias'"):
        head_checkpoints.import_classifier(bare)


P = f"classifiers_dict.{GOLDEN_NAME}."


def _key(name: str) -> str:
    """Regex of a quoted full key name in an error message."""
    return re.escape(f"'{P}{name}'")


def _drop(key):
    return lambda sd: sd.pop(key)


def _set(key, value):
    return lambda sd: sd.update({key: value})


@pytest.mark.parametrize(
    "edit,kwargs,match",
    [
        (_drop("decoder.layers.0.norm3.weight"), {}, "missing key " + _key("decoder.layers.0.norm3.weight")),
        (_drop("decoder.query_embed.weight"), {}, "missing key " + _key("decoder.query_embed.weight")),
        (
            _set("decoder.layers.0.self_attn.in_proj_weight", np.zeros((96, 32), np.float32)),
            {},
            "unknown key " + _key("decoder.layers.0.self_attn.in_proj_weight"),
        ),
        (
            _set("decoder.layers.0.linear2.bias", np.zeros(31, np.float32)),
            {},
            _key("decoder.layers.0.linear2.bias") + r" has shape \(31,\), expected \(32,\)",
        ),
        (
            _set("decoder.duplicate_pooling", np.zeros((5, 100, 1), np.float32)),
            {},
            _key("decoder.duplicate_pooling") + " has width 100: neither the decoder width 32 nor .* 288",
        ),
        (_set("decoder.duplicate_pooling_bias", 3), {}, _key("decoder.duplicate_pooling_bias") + " is a int"),
        (lambda sd: None, {"n_blocks": 3}, _key("decoder.embed_standart.weight") + ": input width 256 .* of 3"),
        (lambda sd: None, {"num_heads": 5}, r"decoder width 32 .* not divisible by num_heads 5"),
    ],
)
def test_bad_heads_name_the_key(golden_head, edit, kwargs, match):
    sd = dict(golden_head)
    edit(sd)
    with pytest.raises(ConversionError, match=match):
        head_checkpoints.import_classifier(sd, where=P, **kwargs)


def test_read_head_file_picks_one_of_several_heads(golden_file, golden_head):
    names = [head_checkpoints.head_name(lr) for lr in LRS]
    model = {f"module.classifiers_dict.{n}.{k}": v + i for i, n in enumerate(names) for k, v in golden_head.items()}
    obj = {"model": model, "optimizer": {"state": {}}, "scheduler": {"last_epoch": 3}, "iteration": 7}
    with pytest.raises(ConversionError, match=r"13 heads; pick one by name: \[.*lr=0_0000100000.*\]"):
        head_checkpoints.read_head_file(obj)
    name, sd = head_checkpoints.read_head_file(obj, head_checkpoints.head_name(5e-4))
    assert name == names[5] and list(sd) == list(golden_head)
    assert all(np.array_equal(sd[k], golden_head[k] + 5) for k in sd)
    with pytest.raises(ConversionError, match=r"no head named 'nope'"):
        head_checkpoints.read_head_file(obj, "nope")
    with pytest.raises(ConversionError, match="unknown key 'dino_loss.center'"):
        head_checkpoints.read_head_file({"model": {**model, "dino_loss.center": np.zeros(3)}}, names[0])
    assert head_checkpoints.is_head_checkpoint(obj) and head_checkpoints.is_head_checkpoint(golden_file)
    assert head_checkpoints.is_head_checkpoint(golden_head) and head_checkpoints.read_head_file(golden_head) == (
        "",
        golden_head,
    )
    assert not head_checkpoints.is_head_checkpoint(torch_io.read_checkpoint(TINY_TEACHER))


# --- PyTorch reference modules ------------------------------------------------------------------


@pytest.mark.parametrize("avgpool", [False, True])
def test_linear_probe_interop(avgpool):
    d, k = 16, 3
    cfg = ClassifierConfig("linear", k, d, avgpool=avgpool)
    state = _random_state(cfg)
    sd = head_checkpoints.export_classifier(cfg, state)
    assert list(sd) == ["linear.weight", "linear.bias"] and sd["linear.weight"].shape == (k, cfg.in_features)
    ref = torch_linear_probe(cfg.in_features, k)
    ref.load_state_dict({n: torch.from_numpy(v) for n, v in sd.items()}, strict=True)
    rng = np.random.default_rng(1)
    feats = head_inputs([(rng.standard_normal((2, d)), None, rng.standard_normal((2, 5, d))) for _ in range(4)])
    x = np.concatenate([feats["cls"], feats["avgpool"]], -1) if avgpool else np.array(feats["cls"])
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(classifier_from_state(cfg, state)(feats), want, atol=1e-5)
    cfg2, state2 = head_checkpoints.import_classifier(sd, avgpool=avgpool)
    assert cfg2 == cfg and _same_tree(state2, state)
    two = cfg.replace(views=2)  # --multiview: twice the input, told by the caller (shapes cannot say)
    sd2 = head_checkpoints.export_classifier(two, _random_state(two))
    assert sd2["linear.weight"].shape == (k, 2 * cfg.in_features)
    assert head_checkpoints.import_classifier(sd2, avgpool=avgpool, views=2)[0] == two
    plain = {"linear.weight": np.zeros((k, 4 * d), np.float32), "linear.bias": np.zeros(k, np.float32)}
    with pytest.raises(ConversionError, match=r"'linear\.weight': input width 64 is not a multiple of 5"):
        head_checkpoints.import_classifier(plain, avgpool=True)  # 4 CLS tokens + the average: 5 equal parts


# --- classifier directories ---------------------------------------------------------------------


def test_classifier_dir_round_trip(tmp_path, golden_head):
    cfg, state = head_checkpoints.import_classifier(golden_head)
    meta = {"lr": 1e-4, "class_names": ["a", "b", "c", "d", "e"], "val_auroc": 0.75}
    assert not is_classifier_dir(tmp_path / "head")
    save_classifier(tmp_path / "head", cfg, state, meta)
    assert is_classifier_dir(tmp_path / "head")
    cfg2, state2, meta2 = load_classifier(tmp_path / "head")
    assert cfg2 == cfg and meta2 == meta and _same_tree(state2, state)
    with pytest.raises(FileExistsError, match="classifier"):
        save_classifier(tmp_path / "head", cfg, state)
    with pytest.raises(ValueError, match="metadata field 'bad' is not JSON-serialisable"):
        save_classifier(tmp_path / "other", cfg, state, {"bad": object()})
    with pytest.raises(ValueError, match=r"variable 'norm1/scale' is missing"):
        save_classifier(tmp_path / "other", cfg, {**state, "norm1": {"bias": state["norm1"]["bias"]}})


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda f: f.pop("multihead_attn/out_proj/bias"), r"npz: variable 'multihead_attn/out_proj/bias' is missing"),
        (
            lambda f: f.update({"linear1/kernel": np.zeros((32, 7), np.float32)}),
            r"classifier\.npz: variable 'linear1/kernel' has shape \(32, 7\), expected \(32, 2048\)",
        ),
        (lambda f: f.update({"extra/kernel": np.zeros(3, np.float32)}), r"unexpected variable 'extra/kernel'"),
        (lambda f: f.update({"query_embed": np.zeros((5, 32), np.int32)}), r"'query_embed' has dtype int32"),
    ],
)
def test_damaged_classifier_dir_names_the_variable(tmp_path, golden_head, corrupt, match):
    cfg, state = head_checkpoints.import_classifier(golden_head)
    save_classifier(tmp_path, cfg, state)
    with np.load(tmp_path / "classifier.npz") as f:
        flat = {k: f[k] for k in f.files}
    corrupt(flat)
    np.savez(tmp_path / "classifier.npz", **flat)
    with pytest.raises(ValueError, match=match):
        load_classifier(tmp_path)


def test_damaged_classifier_files(tmp_path, golden_head):
    cfg, state = head_checkpoints.import_classifier(golden_head)
    save_classifier(tmp_path, cfg, state)
    (tmp_path / "classifier.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"classifier\.npz: cannot be read"):
        load_classifier(tmp_path)
    blob = json.loads((tmp_path / "classifier_config.json").read_text())
    blob["config"]["decoder_width"] = 32
    (tmp_path / "classifier_config.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match=r"classifier_config\.json: unknown ClassifierConfig fields: \['decoder_wid"):
        load_classifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a classifier directory"):
        load_classifier(tmp_path / "nothing")


# --- the convert CLI ------------------------------------------------------------------------------


def test_cli_round_trip(tmp_path, golden_file, golden_head):
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "chexfound_jax.convert", *args], capture_output=True, text=True
    )
    cfg, state = head_checkpoints.import_classifier(golden_head)
    save_classifier(tmp_path / "head", cfg, state, {"lr": 1e-4, "class_names": list("abcde")})
    pth = tmp_path / "model_final.pth"
    r = run("--to=pytorch", f"--checkpoint={tmp_path / 'head'}", f"--out={pth}")
    assert r.returncode == 0, r.stderr
    got = torch.load(pth, weights_only=True)
    assert list(got) == ["model", "iteration"] and got["iteration"] == 0
    assert list(got["model"]) == list(golden_file["model"])  # the official file, key for key
    assert all(np.array_equal(got["model"][k].numpy(), v) for k, v in golden_file["model"].items())
    ref = torch_glori(5, 256, 32, cat_cls=True)
    ref.load_state_dict({k[len(P) :]: v for k, v in got["model"].items()}, strict=True)

    r = run("--to=jax", f"--checkpoint={pth}", f"--out={tmp_path / 'back'}")
    assert r.returncode == 0, r.stderr
    cfg2, state2, meta2 = load_classifier(tmp_path / "back")
    assert cfg2 == cfg and _same_tree(state2, state)
    assert meta2 == {"head_name": GOLDEN_NAME, "lr": 1e-4}
    r = run("--to=jax", f"--checkpoint={pth}", f"--out={tmp_path / 'named'}", "--head_classes=a, b,c,d,e")
    assert r.returncode == 0, r.stderr
    assert load_classifier(tmp_path / "named")[2]["class_names"] == list("abcde")
    r = run("--to=jax", f"--checkpoint={pth}", f"--out={tmp_path / 'wrong'}", "--head_classes=cxr_lt")
    assert r.returncode != 0 and "gives 40 class names for a head of 5 outputs" in r.stderr
