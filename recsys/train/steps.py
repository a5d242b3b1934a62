"""Pure jitted steps: one optimizer step and a loss evaluation, for any model and loss."""

from __future__ import annotations

import jax
from flax import nnx

from recsys import sharding
from recsys.config import TrainConfig
from recsys.models import losses


def retrieval_loss(model, batch: dict, cfg: TrainConfig):
    """In-batch softmax over the global batch, with optional logQ correction and hit masking."""
    q_BxD, c_BxD, temperature = model(batch)
    return losses.in_batch_softmax_loss(
        q_BxD, c_BxD, temperature, batch["item"],
        log_q_B=batch["log_q"] if cfg.logq_correction else None,
        remove_accidental_hits=cfg.remove_accidental_hits)


def make_train_step(graphdef, loss_fn, cfg: TrainConfig, state_shardings, mesh):
    """jit(step)(state, batch) -> (state, loss); the state is donated: it is never reused."""

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        model.train()
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch, cfg)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


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
