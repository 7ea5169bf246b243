"""SSL losses: parity with the official DINOLoss / iBOTPatchLoss / KoLeoLoss (golden losses.npz) and
independent float64 numpy references written from the official loss/*.py on hand-built inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import golden
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chexfound_jax.ssl import losses

TEACHER_TEMP = 0.07
STUDENT_TEMP = 0.1
B, K, N_LOCAL = 4, 256, 8  # golden: b=4 images per crop, 256 prototypes, 8 local crops
SK_TOL = dict(rtol=1e-5, atol=1e-8)
LOSS_TOL = dict(rtol=1e-5)


@pytest.fixture(scope="module")
def g():
    return golden("losses")


# ----------------------------------------------------------------------------- numpy references


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_ce(p: np.ndarray, s: np.ndarray, temp: float = STUDENT_TEMP) -> np.ndarray:
    """CE(p, s) = -Σ_k p_k log softmax(s / temp)_k, per row."""
    return -(p * np_log_softmax(s / temp)).sum(-1)


def np_sinkhorn(t: np.ndarray, temp: float, n_iter: int = 3) -> np.ndarray:
    """The official sinkhorn_knopp_teacher (loss/dino_clstoken_loss.py) on Q = exp(T/τ)ᵀ (K x B), float64."""
    q = np.exp(np.asarray(t, np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(1, keepdims=True)
        q /= k
        q /= q.sum(0, keepdims=True)
        q /= b
    return (q * b).T


def np_koleo(x: np.ndarray, eps: float = 1e-8) -> float:
    x = np.asarray(x, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -1)
    nn = dots.argmax(1)
    return float(-np.mean(np.log(np.linalg.norm(x - x[nn] + eps, axis=-1) + eps)))


# ----------------------------------------------------------------------------- golden parity


def test_dino_sinkhorn_golden(g):
    out = losses.sinkhorn_knopp(g["dino_teacher_logits_swapped"], TEACHER_TEMP)
    np.testing.assert_allclose(out, g["dino_teacher_sinkhorn"], **SK_TOL)


def test_ibot_sinkhorn_golden(g):
    assert g["ibot_teacher_logits"].shape[0] == int(g["ibot_n_masked_patches"][0]) == 23
    out = losses.sinkhorn_knopp(g["ibot_teacher_logits"], TEACHER_TEMP)
    np.testing.assert_allclose(out, g["ibot_teacher_sinkhorn"], **SK_TOL)


def test_ibot_sinkhorn_golden_padded_buffer(g):
    """The 23 masked tokens in an `upperbound`-row buffer padded with huge garbage give the same targets."""
    t = g["ibot_teacher_logits"]
    m = int(g["ibot_upperbound"])
    buf = np.full((m, K), 1e4, np.float32)  # exp(1e4 / 0.07) overflows if it leaks into any sum
    idx = np.random.default_rng(0).permutation(m)[: len(t)]
    buf[idx] = t
    valid = np.zeros(m, bool)
    valid[idx] = True
    out = np.asarray(losses.sinkhorn_knopp(buf, TEACHER_TEMP, valid=valid))
    np.testing.assert_allclose(out[idx], g["ibot_teacher_sinkhorn"], **SK_TOL)
    np.testing.assert_array_equal(out[~valid], 0.0)


def test_dino_losses_golden(g):
    out = losses.dino_loss(
        g["dino_student_local_logits"].reshape(N_LOCAL, B, K),
        g["dino_student_global_logits"].reshape(2, B, K),
        g["dino_teacher_sinkhorn"].reshape(2, B, K),
    )
    for key in ("dino_local_crops_loss", "dino_global_crops_loss"):
        np.testing.assert_allclose(out[key], g[key], **LOSS_TOL, err_msg=key)


def test_koleo_golden(g):
    x = g["koleo_student_global_cls"]
    per_crop = [losses.koleo_loss(x[:B]), losses.koleo_loss(x[B:])]
    np.testing.assert_allclose(per_crop, g["koleo_per_crop"], **LOSS_TOL)
    np.testing.assert_allclose(0.1 * sum(per_crop), g["koleo_loss"], **LOSS_TOL)


def test_ibot_weights_golden(g):
    """masks_weight is 1 / (masked count of the token's image), in mask_indices order."""
    masks, idx = g["ibot_masks"], g["ibot_mask_indices"]
    counts = masks.sum(1)
    np.testing.assert_array_equal(np.flatnonzero(masks.ravel()), idx)
    np.testing.assert_array_equal(g["ibot_masks_weight"], (1.0 / counts[idx // masks.shape[1]]).astype(np.float32))


def test_ibot_loss_golden(g):
    n_global_images = g["ibot_masks"].shape[0]  # 2b = 8, masked or not
    out = losses.ibot_loss(
        g["ibot_student_logits"], g["ibot_teacher_sinkhorn"], g["ibot_masks_weight"], n_global_images
    )
    np.testing.assert_allclose(out, g["ibot_forward_masked"], **LOSS_TOL)
    np.testing.assert_allclose(out * 2 * 0.5, g["ibot_loss"], **LOSS_TOL)


def test_total_loss_golden_end_to_end_jit(g):
    """One jitted function with fixed shapes and traced hyper-parameters, composed as the golden README says
    (dino 1, koleo 0.1 already inside, ibot 3), from raw logits."""

    @jax.jit
    def total(d, teacher_temp, n_global_images):
        teacher = losses.sinkhorn_knopp(d["dino_teacher_logits_swapped"], teacher_temp).reshape(2, B, K)
        dino = losses.dino_loss(
            d["dino_student_local_logits"].reshape(N_LOCAL, B, K),
            d["dino_student_global_logits"].reshape(2, B, K),
            teacher,
        )
        koleo = 0.1 * 2 * losses.koleo_loss(d["koleo_student_global_cls"], group_size=B)  # = 0.1 * (crop1 + crop2)
        ibot_t = losses.sinkhorn_knopp(d["ibot_teacher_logits"], teacher_temp)
        ibot = losses.ibot_loss(d["ibot_student_logits"], ibot_t, d["ibot_masks_weight"], n_global_images)
        return dino["dino_local_crops_loss"] + dino["dino_global_crops_loss"] + koleo + 3.0 * ibot

    keys = [k for k in g if k.endswith(("logits", "logits_swapped", "cls", "masks_weight"))]
    out = total({k: g[k] for k in keys}, jnp.float32(TEACHER_TEMP), jnp.int32(2 * B))
    np.testing.assert_allclose(out, g["total_loss"], **LOSS_TOL)


# ----------------------------------------------------------------------------- Sinkhorn references


def test_sinkhorn_marginals_balanced():
    rng = np.random.default_rng(1)
    n, k = 12, 6
    t = 0.01 * rng.standard_normal((n, k))  # near-uniform logits: a balanced assignment exists
    out = np.asarray(losses.sinkhorn_knopp(t.astype(np.float32), TEACHER_TEMP), np.float64)
    np.testing.assert_allclose(out, np_sinkhorn(t.astype(np.float32), TEACHER_TEMP), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-6)  # every sample's target is a distribution
    np.testing.assert_allclose(out.sum(0), n / k, rtol=1e-2)  # prototypes used equally: B / K each


def test_sinkhorn_matches_reference_sharp():
    rng = np.random.default_rng(2)
    t = rng.uniform(-1, 1, (10, 32)).astype(np.float32)  # |logit| <= 1 like the unit-norm head
    out = losses.sinkhorn_knopp(t, 0.04, n_iterations=5)
    np.testing.assert_allclose(out, np_sinkhorn(t, 0.04, n_iter=5), rtol=1e-5, atol=1e-8)


def test_sinkhorn_padding_rows_are_inert():
    rng = np.random.default_rng(3)
    t = rng.uniform(-1, 1, (7, 16)).astype(np.float32)
    ref = np.asarray(losses.sinkhorn_knopp(t, TEACHER_TEMP))
    padded = np.concatenate([t[:3], np.full((2, 16), 50.0, np.float32), t[3:], np.full((3, 16), -50.0, np.float32)])
    valid = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0], bool)
    out = np.asarray(losses.sinkhorn_knopp(padded, TEACHER_TEMP, valid=valid))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[~valid], 0.0)
    np.testing.assert_allclose(out[valid], ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out[valid], np_sinkhorn(t, TEACHER_TEMP), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- centering alternative


def test_softmax_centering_and_center_update():
    rng = np.random.default_rng(4)
    t = rng.standard_normal((6, 5)).astype(np.float32)
    c = rng.standard_normal((1, 5)).astype(np.float32)
    z = (t.astype(np.float64) - c) / TEACHER_TEMP
    want = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(
        losses.softmax_center_teacher(t, c, TEACHER_TEMP), want / want.sum(1, keepdims=True), rtol=1e-5, atol=1e-8
    )
    np.testing.assert_allclose(losses.update_center(c, t), 0.9 * c + 0.1 * t.mean(0, keepdims=True), rtol=1e-6)
    valid = np.array([1, 0, 1, 1, 0, 0], bool)  # iBOT: mean over the real masked tokens, center (1, 1, K)
    out = losses.update_center(c[None], t, valid=valid)
    assert out.shape == (1, 1, 5)
    np.testing.assert_allclose(out[0], 0.9 * c + 0.1 * t[valid].mean(0, keepdims=True), rtol=1e-6)


# ----------------------------------------------------------------------------- DINO pairs


def test_dino_is_mean_over_18_pairs():
    """student views [g1, g2, l1..l8] x teacher views [g1, g2], excluding the same view: 2 + 16 = 18 pairs."""
    rng = np.random.default_rng(5)
    b, k = 3, 16
    s_global = rng.standard_normal((2, b, k)).astype(np.float32)
    s_local = rng.standard_normal((N_LOCAL, b, k)).astype(np.float32)
    p_teacher = rng.dirichlet(np.ones(k), (2, b)).astype(np.float32)  # p(t1), p(t2) in view order
    students = list(s_global) + list(s_local)

    total, n_pairs = 0.0, 0
    for sv, s in enumerate(students):
        for tv in range(2):
            if sv == tv:
                continue
            total += np_ce(p_teacher[tv].astype(np.float64), s.astype(np.float64)).mean()
            n_pairs += 1
    assert n_pairs == 18

    out = losses.dino_loss(s_local, s_global, p_teacher[::-1])  # the swapped teacher [p(t2); p(t1)]
    np.testing.assert_allclose(out["dino_local_crops_loss"] + out["dino_global_crops_loss"], total / 18, rtol=1e-5)
    local = sum(np_ce(p_teacher[tv], s).mean() for s in s_local for tv in range(2)) / 18
    np.testing.assert_allclose(out["dino_local_crops_loss"], local, rtol=1e-5)


# ----------------------------------------------------------------------------- iBOT weights and divisor


def test_ibot_hand_built():
    """Image 0 has 3 masked tokens, image 1 has 1, images 2-3 none (2b = 4); one padding row."""
    rng = np.random.default_rng(6)
    k = 8
    s = rng.standard_normal((5, k)).astype(np.float32)
    q = rng.dirichlet(np.ones(k), 5).astype(np.float32)
    q[4] = rng.dirichlet(np.ones(k))  # garbage in the padding row: its weight 0 must remove it
    w = np.array([1 / 3, 1 / 3, 1 / 3, 1.0, 0.0], np.float32)
    ce = np_ce(q.astype(np.float64), s.astype(np.float64))
    want = ((ce[0] + ce[1] + ce[2]) / 3 + ce[3]) / 4
    np.testing.assert_allclose(losses.ibot_loss(s, q, w, 4), want, rtol=1e-5)


# ----------------------------------------------------------------------------- KoLeo


def test_koleo_hand_built_circle():
    deg = np.array([0.0, 20.0, 90.0, 200.0])
    scale = np.array([1.0, 3.0, 0.5, 7.0])[:, None]  # normalisation removes the lengths
    x = scale * np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], 1)
    # nearest by angle: 0<->20, 90->20 (70°), 200->90 (110°); chord = 2 sin(Δ/2)
    chords = 2 * np.sin(np.radians(np.array([20.0, 20.0, 70.0, 110.0]) / 2))
    want = -np.mean(np.log(chords))
    np.testing.assert_allclose(losses.koleo_loss(x.astype(np.float32)), want, rtol=1e-6)


def test_koleo_duplicate_points_eps():
    """Identical directions: distance ||0 + eps||_2 = eps√2, then + eps inside the log."""
    x = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]], np.float32)  # rows 0, 1 coincide; 2 ties -> first (0)
    eps = 1e-8
    d2 = np.hypot(-1 + eps, 1 + eps)
    want = -(2 * np.log(eps * np.sqrt(2) + eps) + np.log(d2 + eps)) / 3
    np.testing.assert_allclose(losses.koleo_loss(x), want, rtol=1e-6)


def test_koleo_group_size_is_per_group_mean():
    x = np.random.default_rng(7).standard_normal((12, 5)).astype(np.float32)
    per_group = [np_koleo(x[i : i + 4]) for i in range(0, 12, 4)]
    np.testing.assert_allclose(losses.koleo_loss(x, group_size=4), np.mean(per_group), rtol=1e-5)
    np.testing.assert_allclose(losses.koleo_loss(x), np_koleo(x), rtol=1e-5)
    assert not np.isclose(np.mean(per_group), np_koleo(x))  # grouping really changes the neighbours
    with pytest.raises(ValueError):
        losses.koleo_loss(x, group_size=5)


# ----------------------------------------------------------------------------- jit and sharding


def test_grad_flows_to_student_only_and_equals_the_analytic_one(g):
    def loss(s_local, s_global, x, t):
        teacher = jax.lax.stop_gradient(losses.sinkhorn_knopp(t, TEACHER_TEMP))
        d = losses.dino_loss(s_local, s_global, teacher.reshape(2, B, K))
        return d["dino_local_crops_loss"] + d["dino_global_crops_loss"] + 0.2 * losses.koleo_loss(x, group_size=B)

    s_local = g["dino_student_local_logits"].reshape(N_LOCAL, B, K)
    s_global = g["dino_student_global_logits"].reshape(2, B, K)
    x, t = g["koleo_student_global_cls"], g["dino_teacher_logits_swapped"]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(s_local, s_global, x, t)
    np.testing.assert_array_equal(grads[3], 0.0)  # the teacher's logits get no gradient
    # d CE(p, s) / d s = (softmax(s / τ) - p) / τ, per pair, over the 18 pairs of B rows: each local crop
    # pairs with both teacher crops (whose targets sum to 2 per row), each global crop with the other one.
    p = np_sinkhorn(t, TEACHER_TEMP).reshape(2, B, K)
    softmax = lambda s: np.exp(np_log_softmax(np.asarray(s, np.float64) / STUDENT_TEMP))
    want_local = (2 * softmax(s_local) - p.sum(0)) / (STUDENT_TEMP * B * 18)
    want_global = (softmax(s_global) - p) / (STUDENT_TEMP * B * 18)
    np.testing.assert_allclose(grads[0], want_local, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(grads[1], want_global, rtol=1e-4, atol=1e-8)
    # KoLeo: the directional derivative along a random direction against central differences of the
    # float64 reference (each nearest neighbour stays the same within the step).
    direction = np.random.default_rng(0).standard_normal(x.shape)
    koleo = lambda y: 0.2 * np.mean([np_koleo(y[:B]), np_koleo(y[B:])])
    h = 1e-4
    numeric = (koleo(x + h * direction) - koleo(x - h * direction)) / (2 * h)
    np.testing.assert_allclose(np.sum(np.asarray(grads[2], np.float64) * direction), numeric, rtol=1e-3)


def test_sharded_global_batch_matches_single_device(g):
    """GSPMD turns the batch sums into all-reduces: batch-sharded inputs give the single-device values."""
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("data",)), P("data"))
    t, x = g["dino_teacher_logits_swapped"], g["koleo_student_global_cls"]
    valid = np.arange(8) < 6

    @jax.jit
    def f(t, x, valid):
        sk_valid = losses.sinkhorn_knopp(t, TEACHER_TEMP, valid=valid)
        return losses.sinkhorn_knopp(t, TEACHER_TEMP), losses.koleo_loss(x, group_size=2), sk_valid

    sk, ko, skv = f(*jax.device_put((t, x, valid), sharding))
    assert sk.sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_allclose(sk, g["dino_teacher_sinkhorn"], **SK_TOL)
    np.testing.assert_allclose(ko, np.mean([np_koleo(x[i : i + 2]) for i in range(0, 8, 2)]), rtol=1e-5)
    np.testing.assert_allclose(skv[:6], np_sinkhorn(t[:6], TEACHER_TEMP), **SK_TOL)
    np.testing.assert_array_equal(skv[6:], 0.0)
