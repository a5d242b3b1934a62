"""Streaming estimate of each item's sampling probability (Yi et al. 2019), for the logQ correction.

Per hash bucket h of an item id, arrays sharded like the table rows:
  last_seen[h]  the step the item was last in a batch (0 = never),
  gap[h]        the average number of steps between sightings, per sighting,
  sightings[h]  how many sightings the average has seen (capped), for its warm-up.
The average is a running mean for the first 1/a sightings and a moving average with weight a
after that (Yi et al.'s update, without their cold start from an arbitrary initial value).
An item that appears c times in one step (duplicates in the global batch) counts as c
sightings sharing the gap g since its previous step, each with gap g / c; so the average stays
an estimate of steps per occurrence (a per-sighting update with gaps g, 0, 0, ... would be
biased low for items seen many times a step). Each bucket is updated once per step from sorted
unique ids, so the result does not depend on the order of duplicates. Then
q(item) = 1 / (gap * batch size): the item's share of the stream, the scale of counts / total.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from recsys.models import layers

_MAX_SIGHTINGS = 1 << 30  # the count only matters up to 1/a; the cap keeps int32 from overflowing


@dataclasses.dataclass(frozen=True)
class StreamingLogQ:
    """Settings of the estimate: buckets (a multiple of the row-shard count) and moving-average rate."""

    num_buckets: int  # H: item ids are taken modulo H (collision-free when H covers the vocabulary)
    learning_rate: float = 0.001  # a: weight of a new sighting once past 1/a sightings

    def init(self) -> dict:
        """{"last_seen": int32 [H], "gap": float32 [H], "sightings": int32 [H]}, nothing seen."""
        return {"last_seen": jnp.zeros((self.num_buckets,), jnp.int32),
                "gap": jnp.zeros((self.num_buckets,), jnp.float32),
                "sightings": jnp.zeros((self.num_buckets,), jnp.int32)}

    def buckets(self, ids):
        # Item rows are dense ids, so the remainder spreads them evenly over the buckets.
        return jnp.asarray(ids, jnp.int32) % self.num_buckets

    def observe(self, state: dict, ids_B, step) -> dict:
        """The state after seeing the global batch's items `ids_B` at `step` (1-based)."""
        h_B = self.buckets(ids_B)
        h_U, count_U = layers.unique_ids(h_B, self.num_buckets)
        old = {k: v.at[h_U].get(mode="fill", fill_value=0) for k, v in state.items()}
        step = jnp.asarray(step, jnp.int32)
        per_sighting_U = (step - old["last_seen"]).astype(jnp.float32) / jnp.maximum(count_U, 1)
        keep_U = self._keep(old["sightings"].astype(jnp.float32), count_U.astype(jnp.float32))
        new = {"last_seen": jnp.full_like(h_U, step),
               "gap": keep_U * old["gap"] + (1.0 - keep_U) * per_sighting_U,
               "sightings": jnp.minimum(old["sightings"] + count_U, _MAX_SIGHTINGS)}
        return {k: state[k].at[h_U].set(new[k], mode="drop") for k in state}

    def _keep(self, n_U, c_U):
        """Weight left on the old average after c more sightings, each weighted max(a, 1/k) for
        the k-th sighting ever: a running mean up to 1/a sightings, a moving average after."""
        m = 1.0 / self.learning_rate
        mean_end_U = jnp.maximum(jnp.minimum(n_U + c_U, m), n_U)  # sightings that end the mean
        mean_part_U = jnp.where(mean_end_U > 0, n_U / jnp.maximum(mean_end_U, 1.0), 0.0)
        moving_U = jnp.maximum(n_U + c_U - jnp.maximum(n_U, m), 0.0)
        return mean_part_U * (1.0 - self.learning_rate) ** moving_U

    def log_q(self, state: dict, ids_B, batch_size: int):
        """log q = log(1 / (gap * batch size)) of ids already observed (after `observe`)."""
        gap_B = state["gap"][self.buckets(ids_B)]
        # q <= 1: no item fills more than the whole batch (also keeps unseen buckets finite).
        return -jnp.log(jnp.maximum(gap_B * batch_size, 1.0))
