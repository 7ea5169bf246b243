"""The head bank: AdamW + cosine per lr against torch, NaN handling, and exact resume from checkpoints."""

import os

import numpy as np
import pytest
import synthetic
from helpers import TINY_HEADS, TINY_TEACHER

from chexfound_jax.convert.backbone import load_backbone
from chexfound_jax.data import classification
from chexfound_jax.eval import loop
from chexfound_jax.eval.probe import FrozenFeatures, HeadBank, Optimization
from chexfound_jax.jobs.checkpoint import Checkpointer
from chexfound_jax.models.classifiers import ClassifierConfig
from chexfound_jax.parallel.mesh import create_mesh

torch = pytest.importorskip("torch")
import jax  # noqa: E402

LRS = (1e-3, 3e-2)


@pytest.fixture(scope="module")
def features():
    vit, params = load_backbone(str(TINY_TEACHER), TINY_HEADS)
    return FrozenFeatures(vit, params, n_blocks=4)


@pytest.fixture(scope="module")
def mesh():
    return create_mesh({"data": -1})


def linear_bank(features, mesh, lrs=LRS):
    cfg = ClassifierConfig(kind="linear", num_classes=3, embed_dim=features.cfg.embed_dim)
    return HeadBank(cfg, Optimization(lrs, weight_decay=1e-4), features, mesh)


def test_every_head_follows_torch_adamw_with_cosine_annealing(features, mesh):
    bank = linear_bank(features, mesh)
    total, steps = 5, 4
    state = bank.init(0, total)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    labels = (rng.random((8, 3)) < 0.4).astype(np.float32)
    labels[0, 1] = np.nan  # unknown: masked
    backbone = jax.device_put(features.state, bank.replicated)
    batch = {k: jax.device_put(v, bank.batch_sharding) for k, v in (("image", images), ("labels", labels))}
    feats = np.array(jax.jit(features.__call__)(backbone, batch["image"])["cls"])
    init = jax.tree.map(np.asarray, state["params"].to_pure_dict())
    for _ in range(steps):
        state, _ = bank.train_step(state, backbone, batch, jax.random.key(0))
    got = state["params"].to_pure_dict()["linear"]

    known = np.isfinite(labels)
    x, y = torch.from_numpy(feats), torch.from_numpy(np.where(known, labels, 0.0).astype(np.float32))
    loss_fn = torch.nn.BCEWithLogitsLoss(weight=torch.from_numpy(known.astype(np.float32)), reduction="sum")
    for h, lr in enumerate(LRS):
        head = torch.nn.Linear(feats.shape[1], 3)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(init["linear"]["kernel"][h].T))
            head.bias.copy_(torch.from_numpy(init["linear"]["bias"][h]))
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(head(x), y).backward()
            opt.step()
            sched.step()
        np.testing.assert_allclose(np.asarray(got["kernel"][h]), head.weight.detach().numpy().T, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(np.asarray(got["bias"][h]), head.bias.detach().numpy(), rtol=2e-4, atol=2e-6)


def test_unknown_labels_give_no_gradient_only_weight_decay(features, mesh):
    bank = linear_bank(features, mesh)
    state = bank.init(1, 10)
    before = jax.tree.map(np.asarray, state["params"].to_pure_dict())
    batch = {
        "image": jax.device_put(np.ones((8, 32, 32, 3), np.float32), bank.batch_sharding),
        "labels": jax.device_put(np.full((8, 3), np.nan, np.float32), bank.batch_sharding),
    }
    backbone = jax.device_put(features.state, bank.replicated)
    state, losses = bank.train_step(state, backbone, batch, jax.random.key(0))
    assert np.all(np.asarray(losses) == 0.0)
    after = state["params"].to_pure_dict()
    for h, lr in enumerate(LRS):  # step 0: the full lr; decoupled decay p <- p (1 - lr wd)
        want = before["linear"]["kernel"][h] * (1 - lr * 1e-4)
        np.testing.assert_allclose(np.asarray(after["linear"]["kernel"][h]), want, rtol=1e-6)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_data")
    ds = synthetic.build_shards(synthetic.write_release(root / "release", {"train": 24}), root / "shards")
    from chexfound_jax.eval import tasks

    table = tasks.load_task(
        [ds],
        tasks.task_from_config({**synthetic.task_config(), "splits": {"train": {"shard_split": "train"}}}),
        splits=("train",),
    )["train"]
    return classification.LabelledRecords([ds], [table])


@pytest.mark.parametrize("damaged", [False, True])
def test_resumed_training_is_bitwise_the_uninterrupted_run(features, mesh, records, tmp_path, damaged):
    """Also when the newest checkpoint's array files were cut short: it is set aside and the run resumes from
    the one before, still bitwise equal (batches are a function of the step)."""
    cfg = ClassifierConfig(
        kind="glori", num_classes=2, embed_dim=features.cfg.embed_dim, decoder_dim=16, num_heads=2, ffn_dim=32
    )
    bank = HeadBank(cfg, Optimization(LRS), features, mesh)
    backbone = jax.device_put(features.state, bank.replicated)
    feeder = loop.Feeder(
        mesh=mesh,
        backbone=backbone,
        transform=classification.TrainTransform(image_size=32),
        global_batch=8,
        eval_batch=8,
        read_threads=1,
        read_buffer=2,
    )
    total = 6
    straight = loop.fit(feeder, bank, bank.init(0, total), records, seed=3, steps=total, log={})

    with Checkpointer(tmp_path, save_every=2, keep_last=2, async_save=False) as ckpt:
        interrupted = loop.fit(
            feeder, bank, bank.init(0, total), records, seed=3, steps=3, log={"note": "x"}, checkpointer=ckpt
        )
        assert ckpt.all_steps() == [2, 3] and int(interrupted["step"]) == 3
    if damaged:
        for f in (tmp_path / "3" / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                os.truncate(f, f.stat().st_size // 2)
    log: dict = {}
    with Checkpointer(tmp_path, save_every=2, keep_last=1, async_save=False) as ckpt:
        resumed = loop.fit(feeder, bank, bank.init(99, total), records, seed=3, steps=total, log=log, checkpointer=ckpt)
    assert (tmp_path / "3.damaged").is_dir() == damaged
    assert log["note"] == "x" and [s for s, _ in log["losses"]][-1] == total  # the saved log came back and grew
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flip_modes_mirror_the_width_axis_and_average_probabilities(features, mesh, records):
    cfg = ClassifierConfig(
        kind="glori", num_classes=2, embed_dim=features.cfg.embed_dim, decoder_dim=16, num_heads=2, ffn_dim=32
    )
    bank = HeadBank(cfg, Optimization((0.0,)), features, mesh)
    state = bank.init(5, 1)
    backbone = jax.device_put(features.state, bank.replicated)

    def feeder(flip):
        return loop.Feeder(mesh, backbone, classification.TrainTransform(image_size=32), 8, 8, 1, 2, eval_flip=flip)

    got = {
        f: loop.predict(feeder(f), bank, state["params"], state["rest"], records)[0]
        for f in ("none", "only", "average")
    }
    images = np.stack([classification.eval_image(records.image(i), 32) for i in range(len(records))])
    mirrored = np.ascontiguousarray(images[:, :, ::-1])  # left-right, the (B, H, W, C) width axis
    for name, x in (("none", images), ("only", mirrored)):
        want = np.asarray(
            bank.predict(state["params"], state["rest"], backbone, jax.device_put(x, bank.batch_sharding))
        )
        np.testing.assert_allclose(got[name], want[0], rtol=1e-5, atol=1e-6)
    assert np.abs(got["only"] - got["none"]).max() > 1e-4  # the mirror is a different input
    np.testing.assert_allclose(got["average"], (got["none"] + got["only"]) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eval.flip"):
        feeder("both")


def test_two_view_linear_probe_reads_each_views_cls_and_avgpool_in_order(features, mesh):
    """(B, 2, H, W, C) views: the probe's input is [cls_1 ; avg_1 ; cls_2 ; avg_2] of single-view features."""
    rng = np.random.default_rng(0)
    views = rng.standard_normal((8, 2, 32, 32, 3)).astype(np.float32)
    one = jax.jit(features.__call__)
    backbone = features.state
    got = one(backbone, views)
    first, second = one(backbone, views[:, 0]), one(backbone, views[:, 1])
    np.testing.assert_allclose(got["cls"], np.concatenate([first["cls"], second["cls"]], -1), atol=1e-5)
    np.testing.assert_allclose(got["patch"], first["patch"], atol=1e-5)  # GLoRI's memory: the first view
    cfg = ClassifierConfig(kind="linear", num_classes=3, embed_dim=features.cfg.embed_dim, avgpool=True, views=2)
    assert cfg.in_features == 2 * 5 * features.cfg.embed_dim
    bank = HeadBank(cfg, Optimization((0.0,)), features, mesh)
    state = bank.init(2, 1)
    probs = bank.predict(state["params"], state["rest"], jax.device_put(backbone, bank.replicated), views)
    x = np.concatenate([first["cls"], first["avgpool"], second["cls"], second["avgpool"]], -1)
    w = state["params"].to_pure_dict()["linear"]
    want = 1 / (1 + np.exp(-(x @ np.asarray(w["kernel"][0]) + np.asarray(w["bias"][0]))))
    np.testing.assert_allclose(np.asarray(probs[0]), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="only the linear probe"):
        ClassifierConfig(kind="glori", num_classes=3, embed_dim=8, views=2)


def test_resuming_under_another_configuration_is_refused(tmp_path):
    saved = {"task": {"name": "t"}, "head": {"kind": "glori"}, "train": {"lrs": [1e-3, 1e-2], "log_every": 5}}
    with Checkpointer(tmp_path, save_every=1, keep_last=1, async_save=False) as ckpt:
        ckpt.save(1, {"step": jax.numpy.int32(1)}, {}, saved)
    same = {**saved, "train": {"lrs": (1e-3, 1e-2), "log_every": 50}}  # logging may change; tuples read as lists
    assert loop.config_changes(saved, same) == []
    other = {**saved, "head": {"kind": "linear"}, "train": {"lrs": (1e-3,)}}
    assert loop.config_changes(saved, other) == ["head", "train.lrs"]
    with Checkpointer(tmp_path, save_every=1, keep_last=1) as ckpt:
        with pytest.raises(ValueError, match=r"another configuration \(changed: head, train.lrs\)"):
            loop.fit(None, None, None, None, seed=0, steps=2, log={}, checkpointer=ckpt, config=other)
