"""Chunked iBOT targets + loss (chexfound_jax.ssl.chunked) against the whole computation of losses.py:
values, gradients w.r.t. the student, the new centre, chunk-size edge cases, sharding, compiled memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from chexfound_jax.parallel.mesh import create_mesh
from chexfound_jax.ssl import losses
from chexfound_jax.ssl.chunked import ibot_loss_chunked, teacher_passes

DB, K = 16, 512
TWO_B = 4  # global-crop images per group
M, CHUNK = 37, 8  # M not a multiple of the chunk
STUDENT_TEMP = 0.1
MOMENTUM = 0.9


def _unit(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def make_inputs(seed: int, groups: int, m: int = M) -> dict:
    """Heads' bottleneck features (unit rows), weight-norm-like prototypes (columns of norm ~1) and a
    padded masked-token buffer per group: TWO_B images with random masked counts (some 0), weights
    1 / count, invalid zero-weight padding rows with finite (non-zero) features."""
    rng = np.random.default_rng(seed)
    sz = _unit(rng.normal(size=(groups, m, DB)), -1)
    tz = _unit(sz + 0.5 * rng.normal(size=sz.shape), -1)  # the teacher agrees with the student, roughly
    sw, tw = (_unit(rng.normal(size=(DB, K)), 0) * rng.uniform(0.8, 1.2, K) for _ in range(2))
    valid = np.zeros((groups, m), bool)
    weights = np.zeros((groups, m))
    for g in range(groups):
        counts = rng.integers(0, (m - 1) // TWO_B + 1, TWO_B)
        counts[g % TWO_B] = 0  # an image without masked tokens
        start = 0
        for c in counts:
            valid[g, start : start + c] = True
            weights[g, start : start + c] = 1.0 / max(c, 1)
            start += c
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return {
        "student_z": f32(sz),
        "student_w": f32(sw),
        "teacher_z": f32(tz),
        "teacher_w": f32(tw),
        "valid": jnp.asarray(valid),
        "weights": f32(weights),
        "n_global_images": groups * TWO_B,
        "center": f32(0.1 * rng.normal(size=(1, K))),
    }


def whole(x: dict, temp: float, centering: str, n_iterations: int = 3):
    """The whole (rows, K) computation of train/step.py, as a function of the student."""

    def fn(sz, sw):
        t = x["teacher_z"].reshape(-1, DB) @ x["teacher_w"]
        s = sz.reshape(-1, DB) @ sw
        v = x["valid"].reshape(-1)
        if centering == "sinkhorn_knopp":
            q, new_center = losses.sinkhorn_knopp(t, temp, n_iterations, valid=v), None
        else:
            q = losses.softmax_center_teacher(t, x["center"], temp) * v[:, None]
            new_center = losses.update_center(x["center"], t, MOMENTUM, valid=v)
        q = jax.lax.stop_gradient(q)
        loss = losses.ibot_loss(s, q, x["weights"].reshape(-1), x["n_global_images"], STUDENT_TEMP)
        return loss, new_center

    return fn


def chunked(x: dict, temp: float, centering: str, chunk_size: int = CHUNK, n_iterations: int = 3):
    def fn(sz, sw):
        return ibot_loss_chunked(
            sz,
            sw,
            x["teacher_z"],
            x["teacher_w"],
            temp,
            x["valid"],
            x["weights"],
            x["n_global_images"],
            centering=centering,
            center=x["center"] if centering == "centering" else None,
            center_momentum=MOMENTUM,
            chunk_size=chunk_size,
            student_temp=STUDENT_TEMP,
            n_iterations=n_iterations,
        )

    return fn


def value_and_grads(fn, x: dict):
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(x["student_z"], x["student_w"])


@pytest.mark.parametrize(
    "centering, temp, groups",
    [("sinkhorn_knopp", 0.04, 2), ("sinkhorn_knopp", 0.07, 4), ("centering", 0.04, 4), ("centering", 0.07, 2)],
)
def test_matches_whole(centering, temp, groups):
    x = make_inputs(groups, groups)
    assert not x["valid"].all() and x["valid"].any()
    (ref, ref_center), ref_grads = value_and_grads(whole(x, temp, centering), x)
    (got, got_center), got_grads = value_and_grads(chunked(x, temp, centering), x)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(r))))
    # Padding rows get no gradient.
    assert not jnp.any(got_grads[0][~x["valid"]])
    if centering == "centering":
        np.testing.assert_allclose(got_center, ref_center, rtol=1e-5, atol=1e-7)
    else:
        assert got_center is None and ref_center is None


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
@pytest.mark.parametrize("chunk_size", [M, M + 5, 1])
def test_chunk_size_edge_cases(centering, chunk_size):
    x = make_inputs(1, 2)
    ref, _ = whole(x, 0.04, centering)(x["student_z"], x["student_w"])
    got, _ = chunked(x, 0.04, centering, chunk_size)(x["student_z"], x["student_w"])
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("n_iterations", [1, 5])
def test_sinkhorn_iterations(n_iterations):
    x = make_inputs(2, 2)
    ref, _ = whole(x, 0.07, "sinkhorn_knopp", n_iterations)(x["student_z"], x["student_w"])
    got, _ = chunked(x, 0.07, "sinkhorn_knopp", n_iterations=n_iterations)(x["student_z"], x["student_w"])
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_padding_contents_do_not_matter():
    x = make_inputs(3, 2)
    ref, _ = chunked(x, 0.04, "sinkhorn_knopp")(x["student_z"], x["student_w"])
    pad = ~x["valid"][..., None]
    y = dict(x, teacher_z=jnp.where(pad, 1e3, x["teacher_z"]))
    got, _ = chunked(y, 0.04, "sinkhorn_knopp")(jnp.where(pad, -1e3, x["student_z"]), x["student_w"])
    np.testing.assert_array_equal(got, ref)


def test_teacher_passes():
    assert teacher_passes("sinkhorn_knopp", 3, backward=False) == 4
    assert teacher_passes("sinkhorn_knopp", 3) == 5
    assert teacher_passes("centering", 3, backward=False) == 1
    assert teacher_passes("centering", 3) == 2
    with pytest.raises(ValueError, match="centering"):
        teacher_passes("softmax", 3)


def test_bad_arguments():
    x = make_inputs(4, 1)
    with pytest.raises(ValueError, match="needs the center"):
        chunked(dict(x, center=None), 0.04, "centering")(x["student_z"], x["student_w"])
    with pytest.raises(ValueError, match="n_iterations"):
        chunked(x, 0.04, "sinkhorn_knopp", n_iterations=0)(x["student_z"], x["student_w"])


def _collective_shapes(hlo: str, op: str) -> list[tuple[int, ...]]:
    """Result shapes of every `op` (also its async -start form) in compiled HLO text."""
    found = re.findall(rf"= \(?[a-z0-9]+\[([0-9,]*)\][^=\n]*? {op}(?:-start)?\(", hlo)
    return [tuple(int(d) for d in s.split(",") if d) for s in found]


def test_sharded_over_groups():
    groups, m = 8, 20
    x = make_inputs(5, groups, m)
    mesh = create_mesh({"data": 8})
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def loss(sz, sw, tz, tw, valid, weights):
        return ibot_loss_chunked(sz, sw, tz, tw, 0.04, valid, weights, groups * TWO_B, chunk_size=CHUNK)[0]

    args = [x[k] for k in ("student_z", "student_w", "teacher_z", "teacher_w", "valid", "weights")]
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(rows, rep, rows, rep, rows, rows))
    placed = [jax.device_put(a, s) for a, s in zip(args, (rows, rep, rows, rep, rows, rows), strict=True)]
    (got, got_grads), (ref, ref_grads) = fn(*placed), jax.value_and_grad(loss, argnums=(0, 1))(*args)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for g, r in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
    hlo = fn.lower(*placed).compile().as_text()
    assert "all-gather" not in hlo
    # Only K-vector, scalar and the (Db, K) prototype-gradient all-reduces; nothing with a row axis.
    reduced = _collective_shapes(hlo, "all-reduce")
    assert reduced and all(int(np.prod(s)) <= DB * K for s in reduced), reduced
    assert (K,) in reduced


def test_compiled_memory_stays_per_chunk():
    """value_and_grad at the real head size (G=1, M=2659, Db=256, K=131072), compiled only: the whole
    computation keeps several (M, K) float32 arrays, the chunked one a few (C, K) chunks independent of M."""
    db, k, chunk = 256, 131072, 256

    def temp_bytes(fn, m: int) -> int:
        s = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
        args = (s((1, m, db)), s((db, k)), s((1, m, db)), s((db, k)), s((1, m), bool), s((1, m)))
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def whole_fn(sz, sw, tz, tw, valid, weights):
        q = losses.sinkhorn_knopp(tz[0] @ tw, 0.04, valid=valid[0])
        return losses.ibot_loss(sz[0] @ sw, jax.lax.stop_gradient(q), weights[0], 16)

    def chunked_fn(sz, sw, tz, tw, valid, weights):
        return ibot_loss_chunked(sz, sw, tz, tw, 0.04, valid, weights, 16, chunk_size=chunk)[0]

    m = 2659
    one_array = m * k * 4
    whole_temp, chunked_temp = temp_bytes(whole_fn, m), temp_bytes(chunked_fn, m)
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    print(f"temp: whole {mib(whole_temp)}, chunked {mib(chunked_temp)}; one (M, K) array {mib(one_array)}")
    assert whole_temp > 2 * one_array
    assert chunked_temp < one_array / 2
    assert chunked_temp < 5 * chunk * k * 4  # a few chunk buffers
    assert temp_bytes(chunked_fn, 2 * m) < chunked_temp + 16 * 2**20  # does not grow with M
