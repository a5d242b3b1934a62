"""Pure jitted steps: one optimizer step and a loss evaluation, for any model and loss."""

from __future__ import annotations

import jax
from flax import nnx

from recsys import sharding
from recsys.config import TrainConfig
from recsys.models import losses
from recsys.train import sparse


def retrieval_loss(model, batch: dict, cfg: TrainConfig):
    """Sampled softmax over the global batch plus the configured extra negative sources.

    Each source is corrected by its own log q: in-batch candidates by batch["log_q"], uniform
    ones (uniform_* keys) by uniform_log_q = log(1/N), mined ones (mined_* keys) by
    mined_log_q as train.mined_correction chose it (recsys.train.mining), or not at all when it
    is "none". With train.logq_correction off no source is corrected.
    """
    q_BxD, c_BxD, temperature = model(batch)
    extra = []
    for prefix, count in (("uniform_", cfg.uniform_negatives), ("mined_", cfg.mined_negatives)):
        if count:
            inputs = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
            corrected = cfg.logq_correction and not (prefix == "mined_"
                                                     and cfg.mined_correction == "none")
            extra.append(losses.Negatives(model.embed_items(inputs), inputs["item"],
                                          inputs["log_q"] if corrected else None))
    return losses.sampled_softmax_loss(
        q_BxD, c_BxD, temperature, batch["item"],
        log_q_B=batch["log_q"] if cfg.logq_correction else None, extra=tuple(extra),
        hard_negatives=cfg.hard_negatives, remove_accidental_hits=cfg.remove_accidental_hits)


def make_train_step(graphdef, loss_fn, cfg: TrainConfig, state_shardings, mesh):
    """jit(step)(state, batch) -> (state, loss); the state is donated: it is never reused.

    With a streaming logQ estimate in the state, batch["log_q"] is replaced by the estimate after
    this batch's items are counted. With a row optimizer, tables get gradients w.r.t. the rows
    the batch looked up and are updated sparsely (recsys/train/sparse.py); other parameters,
    and all of them otherwise, are updated by optax.
    """

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        model.train()
        count = opt.step[...] + 1  # 1-based number of this step
        if opt.logq is not None:
            batch = {**batch, "log_q": _observe_items(opt, batch["item"], count)}

        def loss_of(m):
            return loss_fn(m, batch, cfg)

        if opt.tables is None:
            loss, grads = nnx.value_and_grad(loss_of)(model)
        else:
            loss, grads, row_grads = sparse.value_and_grads(model, loss_of)
            sparse.apply_row_updates(model, opt.tables, row_grads, opt.row_rule, count)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def _observe_items(opt, item_B, count):
    """Counts the batch's items into the streaming estimate; returns their log q [B]."""
    arrays = {k: v[...] for k, v in opt.logq.items()}
    arrays = opt.logq_rule.observe(arrays, item_B, count)
    for k, v in opt.logq.items():
        v[...] = arrays[k]
    return opt.logq_rule.log_q(arrays, item_B, item_B.shape[0])


def make_eval_loss(graphdef, loss_fn, cfg: TrainConfig):
    """jit(loss)(state, batch) without updating anything (deterministic mode)."""

    def evaluate(state, batch):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        return loss_fn(model, batch, cfg)

    return jax.jit(evaluate)


def model_of(graphdef, state, *, deterministic: bool = True):
    """The model of a (model, optimizer) state, ready for inference."""
    model, _ = nnx.merge(graphdef, state)
    if deterministic:
        model.eval()
    return model
