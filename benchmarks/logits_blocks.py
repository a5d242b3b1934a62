"""The in-batch softmax's forward and backward pass: recsys's fused softmax at each column block
against autodiff of the written-out softmax, in the same run.

    python -m benchmarks.logits_blocks --json docs/logits_blocks.json

For each batch size, one jitted value-and-gradient of the in-batch softmax loss w.r.t. the query
and candidate vectors [B, 32] (what the train step differentiates), timed over repeated calls
after compilation:
  autodiff   -mean(diag(log_softmax(q c^T / T)))  (the whole [B, B] matrix, autodiff's backward)
  fused/N    recsys.models.losses.sampled_softmax_loss (recsys.models.fused_softmax) with
             row_chunk=N: N candidate columns per block (0: the whole matrix, softmax kept)

Writes JSON with:
  ms_per_call        {batch: {variant: median milliseconds over --repeats timings}}
  speedup_vs_autodiff {batch: {variant: autodiff ms / variant ms}}
  best_block         {batch: the fused variant with the lowest time}
  default_block      {batch: what train.logits_chunk=0 resolves to (recsys.train.steps)}
  provenance         command, commit, recsys source hash
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import provenance
from recsys.config import TrainConfig
from recsys.models import losses
from recsys.train import steps

DIM = 32
TEMPERATURE = 0.05


def autodiff_loss(q_BxD, c_BxD):
    logits_BxB = q_BxD @ c_BxD.T / TEMPERATURE
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits_BxB, axis=1)))


def fused_loss(block: int):
    def loss(q_BxD, c_BxD):
        item_B = jnp.arange(q_BxD.shape[0], dtype=jnp.int32) + 1
        return losses.sampled_softmax_loss(q_BxD, c_BxD, TEMPERATURE, item_B,
                                           remove_accidental_hits=False, row_chunk=block)
    return loss


def time_call(fn, q, c, calls: int, repeats: int) -> float:
    """Median milliseconds per call over `repeats` timings of `calls` calls each."""
    jax.block_until_ready(fn(q, c))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(q, c)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--batch-sizes", default="1024,8192")
    p.add_argument("--blocks", default="0,32,64,128,256,512",
                   help="fused column blocks to time (0 = the whole matrix)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    out = {"dim": DIM, "ms_per_call": {}, "speedup_vs_autodiff": {}, "best_block": {},
           "default_block": {}}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        q = jnp.asarray(rng.normal(size=(b, DIM)) / np.sqrt(DIM), jnp.float32)
        c = jnp.asarray(rng.normal(size=(b, DIM)) / np.sqrt(DIM), jnp.float32)
        calls = max(2, 20_000 // b)
        variants = {"autodiff": autodiff_loss}
        variants.update({f"fused/{n}": fused_loss(n) for n in map(int, args.blocks.split(","))
                         if n < b})
        ms = {}
        for name, loss in variants.items():
            ms[name] = time_call(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), q, c,
                                 calls, args.repeats)
            print(f"B={b} {name}: {ms[name]:.2f} ms", file=sys.stderr)
        out["ms_per_call"][str(b)] = ms
        out["speedup_vs_autodiff"][str(b)] = {k: ms["autodiff"] / v for k, v in ms.items()
                                              if k != "autodiff"}
        fused = {k: v for k, v in ms.items() if k != "autodiff"}
        out["best_block"][str(b)] = min(fused, key=fused.get)
        out["default_block"][str(b)] = steps.logits_chunk(TrainConfig(batch_size=b))
    out["provenance"] = provenance.record()
    provenance.emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
