"""Stage 4: the final k from scored candidates: top-k, MMR diversity, genre caps, exploration."""

from __future__ import annotations

import numpy as np

from recsys.serve.requests import Policy, Request


def order_batch(reqs: list[Request], cand_BxN: np.ndarray, score_BxN: np.ndarray, *,
                item_vectors: np.ndarray, item_genres: np.ndarray,
                similarity: str) -> list[np.ndarray]:
    """Each request's chosen indices into its row of cand_BxN, in serving order."""
    return [order(cand_BxN[i], score_BxN[i], r.k, r.policy, item_vectors=item_vectors,
                  item_genres=item_genres, similarity=similarity, salt=r.user_row)
            for i, r in enumerate(reqs)]


def order(rows_N: np.ndarray, scores_N: np.ndarray, k: int, policy: Policy, *,
          item_vectors: np.ndarray, item_genres: np.ndarray, similarity: str,
          salt: int = 0) -> np.ndarray:
    """Indices into rows_N of the chosen items, in serving order (at most k; -inf never chosen).

    topk: by score. mmr: greedy max of lambda * relevance - (1 - lambda) * max similarity to
    the items already chosen (relevance = score scaled to [0, 1]; similarity = cosine of item
    vectors or of genre vectors). explore: a softmax sample without replacement at the
    policy's temperature (Gumbel top-k), seeded by (policy.seed, salt). genre_cap applies to all
    three: an item is skipped once any of its genres holds genre_cap chosen items.
    """
    valid = np.flatnonzero(np.isfinite(scores_N))
    if len(valid) == 0:
        return valid
    scores = scores_N[valid].astype(np.float64)
    if policy.ordering == "explore":
        rng = np.random.default_rng([policy.seed, salt])
        scores = scores / policy.temperature + rng.gumbel(size=len(scores))
    genres_VxG = item_genres[rows_N[valid]] > 0 if policy.genre_cap else None
    if policy.ordering == "mmr":
        picked = _mmr(rows_N[valid], scores, k, policy, item_vectors, item_genres, similarity,
                      genres_VxG)
    else:
        picked = _greedy(np.argsort(-scores, kind="stable"), k, policy.genre_cap, genres_VxG)
    return valid[picked]


def _greedy(ranked: np.ndarray, k: int, cap: int, genres_VxG) -> np.ndarray:
    """The first k of `ranked` that keep every genre at or under `cap` (0 = no cap)."""
    if not cap:
        return ranked[:k]
    counts_G = np.zeros(genres_VxG.shape[1], np.int64)
    out = []
    for i in ranked:
        if np.any(counts_G[genres_VxG[i]] >= cap):
            continue
        out.append(i)
        counts_G += genres_VxG[i]
        if len(out) == k:
            break
    return np.asarray(out, np.int64)


def _mmr(rows: np.ndarray, scores: np.ndarray, k: int, policy: Policy, item_vectors,
         item_genres, similarity: str, genres_VxG) -> np.ndarray:
    span = scores.max() - scores.min()
    rel = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    feats = (item_vectors[rows] if similarity == "vectors" else item_genres[rows]).astype(np.float64)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    feats = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
    sim_NxN = feats @ feats.T
    lam = policy.mmr_lambda
    max_sim = np.zeros(len(rows))  # similarity to the closest chosen item (negatives count as 0)
    blocked = np.zeros(len(rows), bool)
    counts_G = np.zeros(genres_VxG.shape[1], np.int64) if genres_VxG is not None else None
    out = []
    while len(out) < k and not blocked.all():
        value = np.where(blocked, -np.inf, lam * rel - (1 - lam) * max_sim)
        i = int(np.argmax(value))
        blocked[i] = True
        if counts_G is not None and np.any(counts_G[genres_VxG[i]] >= policy.genre_cap):
            continue
        out.append(i)
        max_sim = np.maximum(max_sim, sim_NxN[i])
        if counts_G is not None:
            counts_G += genres_VxG[i]
    return np.asarray(out, np.int64)
