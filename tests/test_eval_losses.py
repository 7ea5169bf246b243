"""Downstream losses and the lr schedule against PyTorch's own modules (the official code's building blocks)."""

import jax.numpy as jnp
import numpy as np
import pytest

from chexfound_jax.eval import losses
from chexfound_jax.eval.probe import cosine_factor, select_best

torch = pytest.importorskip("torch")


def _labels(rng, shape):
    y = (rng.random(shape) < 0.3).astype(np.float32)
    y[rng.random(shape) < 0.2] = np.nan  # unknown
    y[rng.random(shape) < 0.1] = -1.0  # uncertain left unmapped: unknown too
    return y


def test_masked_bce_is_torch_weighted_sum():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (16, 7)).astype(np.float32)
    y = _labels(rng, logits.shape)
    known = np.isfinite(y) & (y >= 0)
    want = torch.nn.BCEWithLogitsLoss(weight=torch.from_numpy(known.astype(np.float32)), reduction="sum")(
        torch.from_numpy(logits), torch.from_numpy(np.where(known, y, 0.0).astype(np.float32))
    )
    got = losses.masked_bce(jnp.asarray(logits), jnp.asarray(y))
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)


def _torch_asl(x, y, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8):
    """Ridnik et al.'s AsymmetricLoss.forward (disable_torch_grad_focal_loss=True), transcribed."""
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    xs_neg = (xs_neg + clip).clamp(max=1)
    los_pos = y * torch.log(xs_pos.clamp(min=eps))
    los_neg = (1 - y) * torch.log(xs_neg.clamp(min=eps))
    loss = los_pos + los_neg
    with torch.no_grad():
        pt = xs_pos * y + xs_neg * (1 - y)
        w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -(loss * w).sum()


def test_asymmetric_loss_value_and_gradient_match_reference():
    import jax

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (8, 5)).astype(np.float32)
    y = (rng.random(logits.shape) < 0.4).astype(np.float32)
    x = torch.from_numpy(logits).requires_grad_(True)
    want = _torch_asl(x, torch.from_numpy(y))
    want.backward()
    got, grad = jax.value_and_grad(losses.asymmetric_loss)(jnp.asarray(logits), jnp.asarray(y))
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), rtol=1e-4, atol=1e-6)
    # unknown labels contribute nothing
    y_unknown = y.copy()
    y_unknown[0] = np.nan
    expected = losses.asymmetric_loss(jnp.asarray(logits[1:]), jnp.asarray(y[1:]))
    np.testing.assert_allclose(
        float(losses.asymmetric_loss(jnp.asarray(logits), jnp.asarray(y_unknown))), float(expected), rtol=1e-6
    )


def test_head_loss_adds_asl_only_when_asked():
    logits, y = jnp.asarray([[0.3, -1.0]]), jnp.asarray([[1.0, 0.0]])
    assert float(losses.head_loss(logits, y)) == pytest.approx(float(losses.masked_bce(logits, y)))
    both = float(losses.masked_bce(logits, y)) + float(losses.asymmetric_loss(logits, y))
    assert float(losses.head_loss(logits, y, asymmetric=True)) == pytest.approx(both)


def test_cosine_factor_is_torch_cosine_annealing():
    total = 37
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0)
    want = []
    for _ in range(total + 3):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [float(cosine_factor(jnp.int32(s), total)) for s in range(total + 3)]
    np.testing.assert_allclose(got[: total + 1], want[: total + 1], atol=1e-6)
    assert got[-1] == pytest.approx(0.0, abs=1e-7)  # held at 0 past the end, not cycling back up


def test_select_best_ignores_nan_and_prefers_first_on_ties():
    assert select_best([0.5, np.nan, 0.7, 0.7]) == 2
    with pytest.raises(ValueError, match="undefined"):
        select_best([np.nan, np.nan])
