"""Pure jitted steps: one optimizer step for any model and loss, and the retrieval loss."""

from __future__ import annotations

import jax
from flax import nnx

from recsys import sharding
from recsys.config import TrainConfig
from recsys.models import layers, losses
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
    step = step_fn(graphdef, loss_fn, cfg)
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_multi_step(graphdef, loss_fn, cfg: TrainConfig, state_shardings, mesh):
    """jit(steps)(state, batches) -> (state, losses [k]): k steps in one call, a lax.scan over
    batches stacked along a leading axis (sharding.shard_batch(..., stacked=True)).

    The same math as k calls of `make_train_step`'s step (XLA compiles the scan's body apart, so
    float32 rounding may differ in the last bits); one dispatch instead of k, which matters when
    a step takes about as long as launching it (small batches, many devices).
    """
    step = step_fn(graphdef, loss_fn, cfg)

    def steps(state, batches):
        return jax.lax.scan(step, state, batches)

    stacked = jax.sharding.NamedSharding(mesh, sharding.batch_spec(stacked=True))
    return jax.jit(steps, in_shardings=(state_shardings, stacked),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def logits_chunk(cfg: TrainConfig) -> int:
    """The block of the retrieval logits computed at once (train.logits_chunk; 0 = the whole
    batch below 2048 examples per step). Without hard negatives: columns of the fused in-batch
    softmax whose [B, columns] float32 block is about 4 MiB (128 at B = 8192: 47k examples/s
    on 2 CPU cores against 37k at 32, 41k at 512 and 33k unblocked); with them, rows of
    about 2 MiB (64 at B = 8192, the fastest among 64-2048)."""
    if cfg.logits_chunk:
        return cfg.logits_chunk
    if cfg.batch_size < 2048:
        return 0
    block_bytes = (1 << 22) if cfg.hard_negatives == 0 else (1 << 21)
    return max(32, block_bytes // 4 // cfg.batch_size)


def step_fn(graphdef, loss_fn, cfg: TrainConfig):
    """The pure step (state, batch) -> (state, loss) that the jitted calls above wrap."""
    row_chunk = logits_chunk(cfg)

    def step(state, batch):
        with layers.compute_dtype(cfg.compute_dtype), losses.chunked_logits(row_chunk):
            return one_step(state, batch)

    def one_step(state, batch):
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

    return step


def model_of(graphdef, state, *, deterministic: bool = True):
    """The model of a (model, optimizer, logq) state, ready for inference."""
    model = nnx.merge(graphdef, state)[0]
    if deterministic:
        model.eval()
    return model
