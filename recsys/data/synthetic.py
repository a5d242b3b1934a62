"""Synthetic interactions with planted taste clusters, Zipf popularity and drifting tastes."""

from __future__ import annotations

import dataclasses

import numpy as np

from recsys.config import DataConfig
from recsys.data.schema import DataError, ItemInfo, RawData, UserInfo

_CHUNK_USERS = 1 << 16  # users generated at once (bounds temporary memory; fixed for determinism)
_GLOBAL_SHARE = 0.1  # probability an event follows overall popularity instead of the user's cluster
_CLUSTER_REDRAWS = 10  # rejection rounds within the event's own distribution before going uniform
_FEATURE_AFFINITY = 0.7  # probability a user feature takes its cluster's value (else uniform)
_NUM_REGIONS = 8  # user feature 'region': codes 1..8
_NUM_AGE_BUCKETS = 6  # user feature 'age_bucket': codes 1..6
_MAX_TITLED_ITEMS = 1_000_000  # larger catalogues get titles=None (strings cost ~0.5 s per 1e6)
_START_TIME = 1_262_304_000  # 2010-01-01, seconds
_START_SPREAD = 5 * 365 * 86_400  # users join uniformly over five years
_MEAN_GAP = 3 * 86_400  # mean seconds between a user's events


@dataclasses.dataclass(frozen=True)
class _World:
    """The planted structure events are drawn from (C clusters, N items, M = ceil(N / C)).

    Item slots 0..N-1 are a random permutation of the items; slot s holds an item of cluster
    s % C with in-cluster popularity rank s // C, so clusters are balanced and every cluster
    shares one Zipf distribution over ranks.
    """

    num_clusters: int
    cluster_p: np.ndarray  # [C] share of users (and of overall popularity) per cluster
    slot_item: np.ndarray  # [N] item index in each slot
    item_cluster: np.ndarray  # [N] cluster of each item index
    rank_cdf: np.ndarray  # [M] cumulative Zipf probability of in-cluster ranks


def generate(cfg: DataConfig) -> RawData:
    """Generates a deterministic synthetic data set from `cfg.seed`.

    Users start in a taste cluster (C = min(num_clusters, num_items)) and, with probability
    `taste_drift` per event, move to a neighbouring cluster on a ring (c ± 1). Each event is
    an item of the current cluster drawn by Zipf rank within that cluster, or (10% of events)
    an item drawn by overall popularity. A user never sees an item twice. Users have at least
    3 events and `interactions_per_user` on average (3 + a geometric tail), capped at the
    catalogue size.

    Returns:
      RawData named "synthetic": events grouped by user, in time order; raw user and item
      ids are int64 1..U and 1..N; titles such as "Item 17 (Genre-3)" (None when
      num_items > 1e6); user features 'region' and 'age_bucket', tied to the start cluster.
    """
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    world = _make_world(cfg, rng)
    items = _make_items(cfg, world, rng)
    lengths = _event_counts(cfg, rng)
    start_cluster = rng.choice(world.num_clusters, size=cfg.num_users, p=world.cluster_p)
    users = _make_users(world, start_cluster, rng)
    parts = [_user_events(cfg, world, lengths, start_cluster, lo, rng)
             for lo in range(0, cfg.num_users, _CHUNK_USERS)]
    user_ids, item_ids, timestamps = (np.concatenate(p) for p in zip(*parts))
    return RawData(name="synthetic", user_ids=user_ids, item_ids=item_ids,
                   timestamps=timestamps, items=items, users=users)


def _check(cfg: DataConfig) -> None:
    problems = {
        "num_users": cfg.num_users < 1,
        "num_items": cfg.num_items < 3,
        "num_clusters": cfg.num_clusters < 1,
        "num_genres": cfg.num_genres < 1,
        "zipf_exponent": cfg.zipf_exponent < 0,
        "taste_drift": not 0.0 <= cfg.taste_drift <= 1.0,
    }
    for field, bad in problems.items():
        if bad:
            raise DataError(f"synthetic: data.{field}={getattr(cfg, field)} is out of range "
                            "(num_users>=1, num_items>=3, num_clusters>=1, num_genres>=1, "
                            "zipf_exponent>=0, 0<=taste_drift<=1)")


def _make_world(cfg: DataConfig, rng: np.random.Generator) -> _World:
    n, c = cfg.num_items, min(cfg.num_clusters, cfg.num_items)
    cluster_p = rng.dirichlet(np.full(c, 2.0))
    slot_item = rng.permutation(n)
    item_cluster = np.empty(n, np.int32)
    item_cluster[slot_item] = np.arange(n) % c
    rank_cdf = np.cumsum(np.arange(1.0, -(-n // c) + 1) ** -cfg.zipf_exponent)
    return _World(num_clusters=c, cluster_p=cluster_p, slot_item=slot_item,
                  item_cluster=item_cluster, rank_cdf=rank_cdf / rank_cdf[-1])


def _make_items(cfg: DataConfig, world: _World, rng: np.random.Generator) -> ItemInfo:
    """Genres: each cluster has a dominant genre and sometimes a second; years by cluster era."""
    n, c, g = cfg.num_items, world.num_clusters, cfg.num_genres
    cluster = world.item_cluster
    first = rng.permutation(max(c, g))[:c] % g
    second = (first + 1 + rng.integers(0, max(g - 1, 1), size=c)) % g
    has_second = (rng.random(c) < 0.5) & (g > 1)
    row = np.arange(n) * g  # flat offsets of each item's genre row
    extra_genre = rng.integers(0, g, size=n)
    second_on = has_second[cluster] & (rng.random(n) < 0.6)
    extra_on = rng.random(n) < 0.25
    first_on = (rng.random(n) < 0.9) | ~(second_on | extra_on)  # every item has a genre
    flat = np.zeros(n * g, bool)
    flat[row + second[cluster]] = second_on
    flat[row + extra_genre] |= extra_on
    flat[row + first[cluster]] |= first_on
    genres = flat.reshape(n, g)
    era = rng.integers(1950, 2011, size=c)
    year = (era[cluster] + rng.integers(-12, 13, size=n)).astype(np.int32)
    names = tuple(f"Genre-{k}" for k in range(g))
    ids = np.arange(1, n + 1, dtype=np.int64)
    titles = None
    if n <= _MAX_TITLED_ITEMS:
        label = np.array(names)[genres.argmax(axis=1)]
        titles = np.strings.add(np.strings.add("Item ", ids.astype(str)),
                                np.strings.add(np.strings.add(" (", label), ")"))
    return ItemInfo(ids=ids, genres=genres, genre_names=names, year=year, titles=titles)


def _make_users(world: _World, start_cluster: np.ndarray, rng: np.random.Generator) -> UserInfo:
    """'region' and 'age_bucket' follow the start cluster with probability 0.7."""
    u, c = len(start_cluster), world.num_clusters
    columns = []
    for size in (_NUM_REGIONS, _NUM_AGE_BUCKETS):
        of_cluster = rng.integers(0, size, size=c)
        value = np.where(rng.random(u) < _FEATURE_AFFINITY, of_cluster[start_cluster],
                         rng.integers(0, size, size=u))
        columns.append(value + 1)
    return UserInfo(ids=np.arange(1, u + 1, dtype=np.int64),
                    features=np.stack(columns, axis=1).astype(np.int32),
                    feature_names=("region", "age_bucket"),
                    cardinalities=(_NUM_REGIONS + 1, _NUM_AGE_BUCKETS + 1))


def _event_counts(cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """[U] events per user: 3 + a geometric tail with mean interactions_per_user - 3."""
    extra = cfg.interactions_per_user - 3.0
    if extra <= 0:
        counts = np.full(cfg.num_users, 3, np.int64)
    else:
        counts = 2 + rng.geometric(1.0 / (extra + 1.0), size=cfg.num_users)
    return np.minimum(counts, cfg.num_items)


def _per_user_cumsum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[E] cumulative sums restarted at each user's first event (events grouped by user)."""
    total = np.cumsum(values)
    starts = np.cumsum(lengths) - lengths
    before = total[starts] - values[starts]
    return total - np.repeat(before, lengths)


def _user_events(cfg: DataConfig, world: _World, lengths: np.ndarray, start_cluster: np.ndarray,
                 lo: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Events of users lo..lo+_CHUNK_USERS: ([E] user ids, [E] item ids, [E] timestamps)."""
    n_u = lengths[lo:lo + _CHUNK_USERS]
    local = np.repeat(np.arange(len(n_u)), n_u)
    e = len(local)
    first = np.zeros(e, bool)
    first[np.cumsum(n_u) - n_u] = True
    moves = (rng.random(e) < cfg.taste_drift) & ~first
    steps = np.where(moves, rng.integers(0, 2, size=e) * 2 - 1, 0)
    cluster = (start_cluster[lo + local] + _per_user_cumsum(steps, n_u)) % world.num_clusters
    popular = rng.random(e) < _GLOBAL_SHARE
    items = _draw(world, cluster, popular, rng)
    _redraw_repeats(items, local, cluster, popular, world, rng)
    gaps = np.where(first, _START_TIME + rng.integers(0, _START_SPREAD, size=e),
                    1 + rng.exponential(_MEAN_GAP, size=e).astype(np.int64))
    timestamps = _per_user_cumsum(gaps, n_u)
    return (lo + 1 + local).astype(np.int64), (items + 1).astype(np.int64), timestamps


def _draw(world: _World, cluster: np.ndarray, popular: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    """[E] item indices: Zipf within `cluster`, or overall popularity where `popular`.

    Overall popularity is the mixture of the clusters' Zipf laws weighted by `cluster_p`.
    """
    c, n = world.num_clusters, len(world.slot_item)
    cdf = np.cumsum(world.cluster_p)
    cluster = cluster.copy()
    cluster[popular] = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(popular.sum())), c - 1)
    rank = np.minimum(np.searchsorted(world.rank_cdf, rng.random(len(cluster)), side="right"),
                      len(world.rank_cdf) - 1)
    slot = rank * c + cluster
    slot = np.where(slot >= n, slot - c, slot)  # the last rank exists only in some clusters
    return world.slot_item[slot]


def _redraw_repeats(items: np.ndarray, local: np.ndarray, cluster: np.ndarray,
                    popular: np.ndarray, world: _World, rng: np.random.Generator) -> None:
    """Redraws, in place, every event whose item the same user already has, until none repeat.

    The earliest event of a repeated (user, item) keeps it. Redraws follow the event's own
    distribution for `_CLUSTER_REDRAWS` rounds, then the uniform catalogue (always finishes,
    since no user has more events than there are items).
    """
    n = len(world.slot_item)
    key = local.astype(np.int64) * n + items
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    repeat = np.zeros(len(key), bool)
    repeat[1:] = sorted_key[1:] == sorted_key[:-1]
    seen = sorted_key[~repeat]
    todo = np.sort(order[repeat])
    rounds = 0
    while todo.size:
        if rounds < _CLUSTER_REDRAWS:
            new = _draw(world, cluster[todo], popular[todo], rng)
        else:
            new = rng.integers(0, n, size=todo.size)
        cand = local[todo].astype(np.int64) * n + new
        at = np.searchsorted(seen, cand)
        taken = seen[np.minimum(at, len(seen) - 1)] == cand
        unique = np.zeros(todo.size, bool)
        unique[np.unique(cand, return_index=True)[1]] = True
        ok = unique & ~taken
        items[todo[ok]] = new[ok]
        by_key = np.argsort(cand[ok])
        seen = np.insert(seen, at[ok][by_key], cand[ok][by_key])
        todo = todo[~ok]
        rounds += 1
