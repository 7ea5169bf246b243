"""Training the backbone with the head (backbone.adapt = full | lora | bitfit): what trains, what learns, sharding,
exact resume, and the exported backbone.

The backbone is a tiny random ViT with DINOv2's LayerScale init (1e-5): its blocks barely touch the residual
stream, so the frozen class token is nearly the same for every image and a probe on it cannot find the synthetic
pattern, while a trained backbone can route the pattern into it.
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import synthetic
from flax import nnx
from helpers import random_params

from chexfound_jax import evaluate
from chexfound_jax.data import classification
from chexfound_jax.errors import ConfigError
from chexfound_jax.eval import finetune, loop, metrics, tasks
from chexfound_jax.eval.finetune import Adaptation, AdaptedFeatures, TunedBank
from chexfound_jax.eval.probe import FrozenFeatures, HeadBank, Optimization
from chexfound_jax.jobs.checkpoint import Checkpointer
from chexfound_jax.models import lora, weights
from chexfound_jax.models.classifiers import ClassifierConfig
from chexfound_jax.models.model import ModelConfig
from chexfound_jax.models.vit import ViTConfig
from chexfound_jax.parallel.mesh import create_mesh
from configs.eval import tiny_cpu

VIT = ViTConfig(embed_dim=32, depth=2, num_heads=2, patch_size=16, img_size=64, num_register_tokens=0, ffn_layer="mlp")
HEAD = ClassifierConfig(kind="linear", num_classes=2, embed_dim=32, n_blocks=1)
COUNTS = {"train": 48, "val": 16, "test": 32}


@pytest.fixture(scope="module")
def params():
    """Every leaf random, LayerScale near 0.1: each parameter visibly changes the features."""
    return random_params(VIT, seed=0)


@pytest.fixture(scope="module")
def fresh_params(params):
    """DINOv2's LayerScale init (1e-5): the blocks start as near identities."""
    p = jax.tree.map(np.copy, params)
    for block in p["blocks"].values():
        for ls in ("ls1", "ls2"):
            block[ls]["gamma"] = np.full_like(block[ls]["gamma"], 1e-5)
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_data")
    ds = synthetic.build_shards(synthetic.write_release(root / "release", COUNTS, amplitude=60.0), root / "shards")
    task = tasks.task_from_config(synthetic.task_config())
    tables = tasks.load_task([ds], task, splits=tuple(COUNTS))
    return ds, {k: classification.LabelledRecords([ds], [v]) for k, v in tables.items()}, tables


def _mesh(n=1, **axes):
    return create_mesh(axes or {"data": -1}, jax.devices()[:n])


def _feeder(mesh, backbone, batch=16):
    transform = classification.TrainTransform(image_size=64, scale=(1.0, 1.0), flip_p=0.0)
    return loop.Feeder(
        mesh=mesh, backbone=backbone, transform=transform, global_batch=batch, eval_batch=16, read_threads=1,
        read_buffer=2,
    )  # fmt: skip


def _tuned(params, mode, mesh, rules="data_parallel", eps=1e-8, **kw):
    features = AdaptedFeatures(VIT, params, 1, "float32", Adaptation(mode, **kw), mesh, rules)
    return features, TunedBank(HEAD, Optimization((1e-2,), eps=eps), features, mesh)


def _batch(bank, seed=0, n=8):
    rng = np.random.default_rng(seed)
    batch = {"image": rng.standard_normal((n, 64, 64, 3)), "labels": (rng.random((n, 2)) < 0.5)}
    return {k: jax.device_put(jnp.asarray(v, jnp.float32), bank.batch_sharding) for k, v in batch.items()}


def _flat(tree):
    """{"a/b/c": array} of a pure dict or an nnx.State."""
    tree = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def _auroc(feeder, features, state, records, table):
    probs = loop.predict(feeder, HeadBank(HEAD, Optimization((0.0,)), features, feeder.mesh), *state, records)[0]
    return metrics.classification_metrics(table.labels, probs, list(synthetic.CLASSES), n_bootstrap=0)["macro"]["auroc"]


def test_full_fine_tuning_learns_what_the_frozen_probe_cannot(fresh_params, data):
    """Both fit the training images for 30 steps; only the trained backbone separates them."""
    _, records, tables = data
    mesh = _mesh()
    frozen = FrozenFeatures(VIT, fresh_params, 1)
    feeder = _feeder(mesh, frozen.state)
    bank = HeadBank(HEAD, Optimization((1e-2,)), frozen, mesh)
    state = loop.fit(feeder, bank, bank.init(0, 30), records["train"], seed=0, steps=30, log={})
    frozen_auroc = _auroc(feeder, frozen, (state["params"], state["rest"]), records["train"], tables["train"])

    features, tuned = _tuned(fresh_params, "full", mesh, lr=1e-2)
    feeder = _feeder(mesh, features.state)
    state = loop.fit(feeder, tuned, tuned.init(0, 30), records["train"], seed=0, steps=30, log={})
    feeder.backbone = tuned.backbone_state(state)
    tuned_auroc = _auroc(feeder, features, (state["params"], state["rest"]), records["train"], tables["train"])
    assert frozen_auroc < 0.7 and tuned_auroc > 0.9, (frozen_auroc, tuned_auroc)


def test_bitfit_trains_the_biases_only(params):
    features, bank = _tuned(params, "bitfit", _mesh(), lr=1e-2)
    state = bank.init(0, 4)
    for step in range(2):
        state, _ = bank.train_step(state, features.state, _batch(bank, step), jax.random.key(0))
    before, after = _flat(features.state), _flat(bank.backbone_state(state))
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith("bias")}, changed


@pytest.fixture(scope="module")
def lora_bank(params):
    """One LoRA bank (its compiled step) for the tests below."""
    return _tuned(params, "lora", _mesh(), lr=1e-2, lora=lora.LoRAConfig(rank=4, alpha=8.0))


def test_lora_keeps_the_base_weights_and_its_merged_export_computes_the_same_features(lora_bank):
    features, bank = lora_bank
    state = bank.init(0, 4)
    for step in range(2):
        state, _ = bank.train_step(state, features.state, _batch(bank, step), jax.random.key(0))
    before, after = _flat(features.state), _flat(bank.backbone_state(state))
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_b", "lora_a", "bias")) for k in changed), changed
    assert any(k.endswith("lora_b") for k in changed) and any(k.endswith("qkv/bias") for k in changed)
    merged = lora.merge_params(jax.tree.map(np.asarray, nnx.to_pure_dict(bank.backbone_state(state))), 2.0)
    plain = FrozenFeatures(VIT, jax.tree.map(np.asarray, merged), 1)

    @jax.jit
    def cls_tokens(trained, initial, exported, images):
        return features(trained, images)["cls"], features(initial, images)["cls"], plain(exported, images)["cls"]

    want, untrained, got = cls_tokens(bank.backbone_state(state), features.state, plain.state, _batch(bank, 5)["image"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - untrained).max() > 1e-2  # it did train


def test_fsdp_over_eight_devices_equals_one_device(params):
    # Adam's eps at 1e-4: the key bias has no gradient in exact arithmetic (softmax ignores a constant per
    # query), and eps 1e-8 would scale its rounding noise, different on another layout, up to +-lr.
    results = []
    for mesh, rules in ((_mesh(1), "data_parallel"), (_mesh(8, data=1, fsdp=-1), "fsdp")):
        features, bank = _tuned(params, "full", mesh, rules, eps=1e-4, lr=1e-2, layer_decay=0.5)
        state = bank.init(0, 2)
        losses = []
        for step in range(2):
            state, loss = bank.train_step(state, features.state, _batch(bank, step), jax.random.key(1))
            losses.append(np.asarray(loss))
        results.append((state, losses))
    (one, l1), (eight, l8) = results
    kernel = eight["backbone"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in str(kernel[...].sharding.spec)  # the backbone and its moments are split as in pretraining
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_resumed_fine_tuning_is_bitwise_the_uninterrupted_run(lora_bank, data, tmp_path):
    _, records, _ = data
    features, bank = lora_bank  # with adapter dropout
    feeder = _feeder(bank.mesh, features.state, batch=8)
    total = 4
    straight = loop.fit(feeder, bank, bank.init(0, total), records["train"], seed=3, steps=total, log={})
    with Checkpointer(tmp_path, save_every=2, keep_last=1, async_save=False) as ckpt:
        loop.fit(feeder, bank, bank.init(0, total), records["train"], seed=3, steps=2, log={}, checkpointer=ckpt)
    with Checkpointer(tmp_path, save_every=2, keep_last=1, async_save=False) as ckpt:
        resumed = loop.fit(
            feeder, bank, bank.init(9, total), records["train"], seed=3, steps=total, log={}, checkpointer=ckpt
        )
    assert set(resumed) >= {"backbone", "backbone_opt"}
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _config(dataset, **changes):
    c = tiny_cpu.get_config()
    c.data.datasets = (os.fspath(dataset),)
    c.task = synthetic.task_config()
    c.data.update(train_scale=(1.0, 1.0), flip_p=0.0)
    c.head.update(kind="linear", avgpool=False)
    c.backbone.update(n_last_blocks=1, adapt="lora", lr=1e-2)
    c.backbone.lora.update(rank=4, alpha=8.0)
    c.train.update(lrs=(1e-2,), val_epochs=2, epochs=2, eval_period_epochs=2, checkpoint_every=0)
    c.report.plots = False
    c.metrics.n_bootstrap = 0
    c.update_from_flattened_dict(changes)
    return c


def test_lora_probe_exports_the_backbone_and_predict_reads_it(params, data, tmp_path):
    dataset, _, tables = data
    checkpoint = weights.save_weights(tmp_path / "weights", ModelConfig(backbone=VIT), {"backbone": params})
    workdir = tmp_path / "run"
    results = evaluate.evaluate(_config(dataset, **{"refit.enabled": False}), os.fspath(checkpoint), workdir)
    assert np.isfinite(results["macro"]["auroc"])
    cfg, saved = weights.load_weights(workdir / "backbone")
    assert cfg.backbone == VIT and not lora.adapted_module_names(saved["backbone"])  # merged: a plain ViT
    assert (workdir / "backbone" / "adapter" / "adapter_model.safetensors").is_file()
    changed = [k for k, v in _flat(saved["backbone"]).items() if not np.array_equal(v, _flat(params)[k])]
    assert any(k.endswith("qkv/kernel") for k in changed)  # the adapters merged into the kernels

    # predict with the head dir reads the backbone saved next to it, not --checkpoint (the untrained one)
    p = _config(dataset, workflow="predict", **{"predict.head": str(workdir / "head"), "predict.split": "test"})
    evaluate.evaluate(p, os.fspath(checkpoint), tmp_path / "predict")
    want = (workdir / "test" / "predictions.csv").read_text()
    assert (tmp_path / "predict" / "predictions.csv").read_text() == want
    assert len(want.splitlines()) == len(tables["test"]) + 1

    pytest.importorskip("torch")
    from chexfound_jax.convert import pytorch, torch_io
    from chexfound_jax.convert.__main__ import to_pytorch

    to_pytorch(os.fspath(workdir / "backbone"), os.fspath(tmp_path / "backbone.pth"), "chexfound", False)
    _, back = pytorch.import_state_dict(torch_io.read_checkpoint(pathlib.Path(tmp_path / "backbone.pth")))
    for k, v in _flat(saved["backbone"]).items():
        np.testing.assert_array_equal(_flat(back["backbone"])[k], v)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("backbone.adapt", "partial", "backbone.adapt must be one of"),
        ("train.lrs", (1e-3, 1e-2), "train.lrs: backbone.adapt='lora' trains one head lr"),
        ("backbone.layer_decay", 1.5, "backbone.layer_decay must be in"),
        ("backbone.lr", 0.0, "backbone.lr must be positive"),
        ("backbone.remat", "sometimes", "backbone.remat: remat 'sometimes'"),
        ("backbone.lora.bias", "some", "backbone.lora: LoRA bias 'some'"),
    ],
)
def test_config_errors_name_the_key(key, value, message):
    c = _config("unused", **{key: value})
    with pytest.raises(ConfigError, match=message):
        finetune.adaptation(c)


def test_a_changed_adaptation_is_not_resumed():
    saved = json.loads(json.dumps(_config("unused").to_dict()))  # as a checkpoint holds it
    for key, value in (("backbone.adapt", "full"), ("backbone.lr", 1e-4), ("backbone.lora.rank", 8)):
        assert loop.config_changes(saved, _config("unused", **{key: value})) == ["backbone"], key


def test_the_defaults_are_the_frozen_probe_and_the_official_lora():
    from configs.eval import base, lora_shenzhen

    assert finetune.adaptation(base.get_config()) == Adaptation()  # frozen: the probe as before
    tuned = finetune.adaptation(lora_shenzhen.get_config())
    assert (tuned.mode, tuned.lr, tuned.lora) == ("lora", 1e-5, lora.LoRAConfig())  # peft's official LoraConfig
