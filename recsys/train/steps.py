"""Pure jitted steps: one optimizer step for any model and loss, and the retrieval loss."""

from __future__ import annotations

import jax
from flax import nnx

from recsys import sharding
from recsys.config import TrainConfig
from recsys.train import sparse
from recsys.train.negatives import Negatives


def retrieval_loss(model, batch: dict, cfg: TrainConfig):
    """Sampled softmax over the global batch plus the extra negatives of batch["negatives"].

    batch: query and positive-item inputs, and "negatives": a `Negatives` (recsys.train.negatives)
    with every source, its log q correction and the hard-negative k; so `cfg` is not read here.
    """
    del cfg
    negatives: Negatives = batch["negatives"]
    q_BxD, c_BxD, temperature = model(batch)
    return negatives.loss(model, q_BxD, c_BxD, temperature, batch["item"])


def make_train_step(graphdef, loss_fn, cfg: TrainConfig, state_shardings, mesh):
    """jit(step)(state, batch) -> (state, loss); the state is donated: it is never reused.

    The state is (model, optimizer, logq) split by `recsys.train.state`. With a streaming logQ
    estimate (logq not None), the positives' log q in batch["negatives"] is replaced by the
    estimate after this batch's items are counted. With a row optimizer, tables get gradients
    w.r.t. the rows the batch looked up and are updated sparsely (recsys/train/sparse.py); other
    parameters, and all of them otherwise, are updated by optax.
    """

    def step(state, batch):
        model, opt, logq = nnx.merge(graphdef, state)
        model.train()
        count = opt.step[...] + 1  # 1-based number of this step
        if logq is not None:
            negatives = batch["negatives"].replace(log_q=logq.observe(batch["item"], count))
            batch = {**batch, "negatives": negatives}

        def loss_of(m):
            return loss_fn(m, batch, cfg)

        if opt.tables is None:
            loss, grads = nnx.value_and_grad(loss_of)(model)
        else:
            loss, grads, row_grads = sparse.value_and_grads(model, loss_of)
            sparse.apply_row_updates(model, opt.tables, row_grads, opt.row_rule, count)
        opt.update(model, grads)
        return nnx.state((model, opt, logq)), loss

    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def model_of(graphdef, state, *, deterministic: bool = True):
    """The model of a (model, optimizer, logq) state, ready for inference."""
    model = nnx.merge(graphdef, state)[0]
    if deterministic:
        model.eval()
    return model
