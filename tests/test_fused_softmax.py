"""The fused in-batch softmax (hand-written backward, column blocks) against autodiff of the
plain formula: values and every gradient, whole and in blocks, on one device and on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from recsys.models import fused_softmax, losses

B, D, H, M = 48, 8, 3, 5


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    def f32(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    def ints(high, *shape):
        return jnp.asarray(rng.integers(0, high, shape), jnp.int32)

    return {"q": f32(B, D), "c": f32(B, D), "temperature": jnp.float32(0.3), "log_q": f32(B),
            "item": ints(11, B) + 1,  # 11 items over 48 rows: many accidental hits
            "uni_c": f32(M, D), "uni_item": ints(12, M),
            "mined_c": f32(B, H, D), "mined_item": ints(12, B, H), "mined_log_q": f32(B, H)}


def _plain_loss(q, c, temperature, log_q, uni_c, mined_c, x):
    """The mixed softmax written out: the whole [B, B + M + H] matrix, autodiff's gradients."""
    logits = q @ c.T / temperature - log_q[None, :]
    hit = (x["item"][:, None] == x["item"][None, :]) & ~jnp.eye(B, dtype=bool)
    logits = jnp.where(hit, losses.MASK_VALUE, logits)
    uni = q @ uni_c.T / temperature + np.log(20.0)
    uni = jnp.where((x["uni_item"][None, :] == x["item"][:, None]) | (x["uni_item"] == 0)[None, :],
                    losses.MASK_VALUE, uni)
    mined = jnp.einsum("bd,bhd->bh", q, mined_c) / temperature - x["mined_log_q"]
    mined = jnp.where((x["mined_item"] == x["item"][:, None]) | (x["mined_item"] == 0),
                      losses.MASK_VALUE, mined)
    all_logits = jnp.concatenate([logits, uni, mined], axis=1)
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(all_logits, axis=1)[:, :B]))


def _recsys_loss(q, c, temperature, log_q, uni_c, mined_c, x, block):
    extra = (losses.NegativeSource(uni_c, x["uni_item"], jnp.full((M,), -np.log(20.0))),
             losses.NegativeSource(mined_c, x["mined_item"], x["mined_log_q"]))
    return losses.sampled_softmax_loss(q, c, temperature, x["item"], log_q_B=log_q, extra=extra,
                                       row_chunk=block)


ARGS = ("q", "c", "temperature", "log_q", "uni_c", "mined_c")


@pytest.mark.parametrize("block", [0, 16, 10, 7])  # 10 and 7 do not divide 48: nearest divisor
def test_fused_loss_and_every_gradient_match_autodiff_of_the_plain_softmax(block):
    x = _inputs()
    args = [x[k] for k in ARGS]
    want, want_grads = jax.value_and_grad(_plain_loss, argnums=tuple(range(6)))(*args, x)
    got, got_grads = jax.value_and_grad(_recsys_loss, argnums=tuple(range(6)))(*args, x, block)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, g, w in zip(ARGS, got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=name)


def test_fused_logsumexp_without_correction_or_masking_is_logsumexp_of_the_scores():
    x = _inputs(1)
    for block in (0, 12):
        got = fused_softmax.in_batch_logsumexp(x["q"], x["c"], 2.0, block=block)
        want = jax.nn.logsumexp(x["q"] @ x["c"].T / 2.0, axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="mask_hits needs item_B"):
        fused_softmax.in_batch_logsumexp(x["q"], x["c"], 1.0, mask_hits=True)


@pytest.mark.parametrize("block", [0, 12])
def test_fused_loss_on_a_mesh_matches_one_device(block):
    """The batch split over 8 devices (as the train step splits it): same loss and gradients."""
    x = _inputs(2)
    args = [x[k] for k in ARGS]
    grad = jax.value_and_grad(_recsys_loss, argnums=tuple(range(6)))
    want, want_grads = jax.jit(grad, static_argnums=7)(*args, x, block)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as recsys
    rows = NamedSharding(mesh, P("data"))
    placed = {k: (jax.device_put(v, rows) if np.ndim(v) and np.shape(v)[0] == B else v)
              for k, v in x.items()}
    with jax.set_mesh(mesh):
        got, got_grads = jax.jit(grad, static_argnums=7)(*[placed[k] for k in ARGS], placed, block)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, g, w in zip(ARGS, got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=name)
