"""The training loss against the original's number and a NumPy reference; the schedule, AdamW and
EMA against the formulas of docs/original.md#training and a NumPy AdamW written from torch's
documented update."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dwise_jax import losses, optim


def _np_loss(preds, targets, weights):
    w = weights / weights.sum()
    total = 0.0
    for m, (p, y) in enumerate(zip(preds, targets, strict=True)):
        for b in range(p.shape[0]):
            if w[b, m] != 0:
                total += w[b, m] * np.sum(p[b] - y[b] * np.log(p[b] + 1e-8), dtype=np.float64)
    return total


def test_loss_equals_fixture(small_model_fixture):
    f, meta = small_model_fixture
    n = len(meta["constructor_kwargs"]["readout_outputs"])
    preds = [np.moveaxis(f[f"output/train/{i}"], 1, 2) for i in range(n)]  # -> (B, T, N)
    targets = [np.moveaxis(f[f"input/targets/{i}"], 1, 2) for i in range(n)]
    loss = losses.mice_poisson_loss(preds, targets, jnp.asarray(f["input/mice_weights"]))
    expected = float(f["output/train/loss"])
    assert abs(float(loss) - expected) / abs(expected) < 1e-4


def test_loss_equals_numpy_reference_and_own_mouse_form():
    rng = np.random.default_rng(0)
    counts, batch, time = (5, 9, 3), 6, 4
    mouse = np.array([0, 2, 1, 2, 2, 0])
    preds = [rng.uniform(0.01, 3, size=(batch, time, n)).astype(np.float32) for n in counts]
    padded = np.zeros((batch, time, max(counts)), np.float32)
    for b, m in enumerate(mouse):
        padded[b, :, : counts[m]] = rng.uniform(0, 2, size=(time, counts[m]))
    weights = np.eye(3, dtype=np.float32)[mouse]
    targets = [padded[..., :n] for n in counts]
    expected = _np_loss(preds, targets, weights)
    got = losses.mice_poisson_loss(preds, targets, jnp.asarray(weights))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    own = losses.own_mouse_loss(preds, jnp.asarray(padded), jnp.asarray(mouse))
    assert float(own) == pytest.approx(expected, rel=1e-5)
    # A padding sample (weight 0) is ignored: same as dropping it from the batch.
    keep = np.array([1, 1, 1, 1, 1, 0], np.float32)
    dropped = _np_loss([p[:5] for p in preds], [t[:5] for t in targets], weights[:5])
    got = losses.own_mouse_loss(preds, jnp.asarray(padded), jnp.asarray(mouse), jnp.asarray(keep))
    assert float(got) == pytest.approx(dropped, rel=1e-5)


def test_loss_is_float32_for_bfloat16_predictions():
    pred = [jnp.full((2, 3, 4), 0.5, jnp.bfloat16)]
    target = [jnp.full((2, 3, 4), 1e-3, jnp.bfloat16)]
    loss = losses.mice_poisson_loss(pred, target, jnp.ones((2, 1)))
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(12 * (0.5 - 1e-3 * math.log(0.5 + 1e-8)), rel=1e-2)


def test_schedule_at_chosen_steps():
    base, low = optim.scaled_lr(3e-4, 32), optim.scaled_lr(3e-6, 32)
    assert base == pytest.approx(2.4e-3) and low == pytest.approx(2.4e-5)
    warm, cos = 6750, 40500
    schedule = optim.lr_schedule(base, low, warm, cos)

    def expected(k):
        if k < warm:
            return base * k / warm
        j = k - warm
        return low + (base - low) * (1 + math.cos(math.pi * j / cos)) / 2

    for k in (0, 1, 3375, 6749, 6750, 6751, 20000, 6750 + 20250, 47249, 47250):
        assert float(schedule(k)) == pytest.approx(expected(k), rel=1e-5, abs=1e-12)
    assert float(schedule(0)) == 0.0
    assert float(schedule(47250)) == pytest.approx(low, rel=1e-6)
    assert float(schedule(60000)) == pytest.approx(low, rel=1e-6)


def test_adamw_step_equals_torch_formula():
    """torch.optim.AdamW: p -= lr * wd * p; m, v moments; p -= lr * m_hat / (sqrt(v_hat) + eps)."""
    rng = np.random.default_rng(1)
    p = rng.normal(size=5).astype(np.float64)
    grads = [rng.normal(size=5) for _ in range(3)]
    lrs = [1e-3, 2e-3, 3e-3]
    schedule = lambda step: jnp.asarray(lrs)[step]
    tx = optim.adamw(schedule, weight_decay=0.05)
    params = jnp.asarray(p, jnp.float32)
    state = tx.init(params)
    m = v = np.zeros(5)
    ref = p.copy()
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = params + updates
        ref = ref - lr * 0.05 * ref
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(params), ref, rtol=1e-5)


def test_ema_update_covers_every_float_leaf():
    ema = {"params": {"w": np.ones(3, np.float32)}, "stats": {"var": np.zeros(2, np.float32)},
           "count": np.int32(4)}
    new = {"params": {"w": np.full(3, 3.0, np.float32)}, "stats": {"var": np.ones(2, np.float32)},
           "count": np.int32(5)}
    out = optim.ema_update(ema, new, 0.999)
    np.testing.assert_allclose(out["params"]["w"], 0.999 + 0.001 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(out["stats"]["var"], 0.001, rtol=1e-5)
    assert int(out["count"]) == 5
