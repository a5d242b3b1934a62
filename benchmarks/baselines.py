"""Popularity and EASE on the project's split and metrics code (EASE's lambda tuned on validation).

    python -m benchmarks.baselines --data ../shared/data/ml-latest-small --json runs/baselines.json

Both baselines read the same `Dataset` as the two-tower model and are ranked by
`recsys.eval.ranking.target_ranks` (all items, the user's earlier items excluded, ties against
the target) and scored by `recsys.eval.metrics.ranking_metrics`, so every number is comparable.
Validation: fitted on train events, the user's history is its train events. Test: fitted on
train + validation events, the history includes the validation event.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import provenance
from recsys.config import DataConfig, EvalConfig
from recsys.data import dataset as dataset_lib
from recsys.data.dataset import Dataset
from recsys.data.sources import load_raw
from recsys.eval import metrics, protocol, ranking

LAMBDAS = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)  # EASE L2 grid, tuned on validation


def fit_positions(ds: Dataset, split: str) -> np.ndarray:
    """Events a baseline may learn from before evaluating `split`: every earlier event."""
    return ds.train_positions("train" if split == "val" else "train+val")


def interaction_matrix(ds: Dataset, positions: np.ndarray) -> np.ndarray:
    """Binary user x item matrix [U, V] (float32) of the events at `positions` (row/col 0 empty)."""
    x_UxV = np.zeros((ds.users.size, ds.items.size), np.float32)
    x_UxV[ds.seq_users[positions], ds.seq_items[positions]] = 1.0
    return x_UxV


def ease_weights(x_UxN: np.ndarray, lam: float) -> np.ndarray:
    """EASE item-item weights B [N, N] (Steck 2019): argmin |X - XB|^2 + lam |B|^2, diag(B) = 0.

    Closed form: P = (X^T X + lam I)^-1, B = -P / diag(P) column-wise, with a zero diagonal.
    """
    gram_NxN = x_UxN.T.astype(np.float64) @ x_UxN.astype(np.float64)
    gram_NxN[np.diag_indices_from(gram_NxN)] += lam
    p_NxN = np.linalg.inv(gram_NxN)
    b_NxN = -p_NxN / np.diag(p_NxN)[None, :]
    b_NxN[np.diag_indices_from(b_NxN)] = 0.0
    return b_NxN.astype(np.float32)


def _ranks(ds: Dataset, split: str, q_QxD: np.ndarray, items_VxD: np.ndarray,
           cfg: EvalConfig) -> np.ndarray:
    positions = protocol.eval_positions(ds, split, cfg)
    offsets, excluded = ds.earlier_items(positions)
    return ranking.target_ranks(q_QxD, items_VxD, ds.seq_items[positions], offsets, excluded,
                                item_chunk=cfg.item_chunk)


def popularity(ds: Dataset, split: str, cfg: EvalConfig) -> dict:
    """Every user gets the items by how often they occur among the fitted events."""
    ranks = protocol.popularity_ranks(ds, split, cfg)
    return metrics.ranking_metrics(ranks, cfg.ks)


def ease_ranks(ds: Dataset, split: str, lam: float, cfg: EvalConfig) -> np.ndarray:
    """Target ranks [Q] under EASE scores x_u B, x_u = the user's fitted events (its history)."""
    x_UxV = interaction_matrix(ds, fit_positions(ds, split))
    active = np.flatnonzero(x_UxV.any(axis=0))  # items never seen score 0 (their B column is 0)
    b_NxN = ease_weights(x_UxV[:, active], lam)
    positions = protocol.eval_positions(ds, split, cfg)
    q_QxN = x_UxV[ds.seq_users[positions]][:, active]
    items_VxN = np.zeros((ds.items.size, len(active)), np.float32)
    items_VxN[active] = b_NxN.T  # score(u, i) = sum_j x_uj B_ji = q_u . items_i
    return _ranks(ds, split, q_QxN, items_VxN, cfg)


def ease(ds: Dataset, split: str, lam: float, cfg: EvalConfig) -> dict:
    """Protocol metrics of EASE on `split`."""
    return metrics.ranking_metrics(ease_ranks(ds, split, lam, cfg), cfg.ks)


def tune_ease(ds: Dataset, cfg: EvalConfig, lambdas=LAMBDAS) -> tuple[float, list[dict]]:
    """(best lambda by validation HR@10, the validation row of every lambda)."""
    rows = [{"lambda": lam, **ease(ds, "val", lam, cfg)} for lam in lambdas]
    best = max(rows, key=lambda r: (r["hr@10"], r["ndcg@10"]))
    return best["lambda"], rows


def run(data_cfg: DataConfig, eval_cfg: EvalConfig, lambdas=LAMBDAS) -> dict:
    """Popularity and tuned EASE on validation and test; returns a JSON-able dict."""
    t0 = time.time()
    ds = dataset_lib.build(load_raw(data_cfg), data_cfg)
    lam, grid = tune_ease(ds, eval_cfg, lambdas)
    return {
        "dataset": ds.name, "num_users": ds.num_users, "num_items": ds.num_items,
        "popularity": {"val": popularity(ds, "val", eval_cfg),
                       "test": popularity(ds, "test", eval_cfg)},
        "ease": {"lambda": lam, "val_grid": grid, "test": ease(ds, "test", lam, eval_cfg)},
        "wall_seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="MovieLens directory (any layout)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--lambdas", default=",".join(str(x) for x in LAMBDAS))
    args = p.parse_args(argv)
    result = run(DataConfig(source="movielens", path=args.data), EvalConfig(),
                 tuple(float(x) for x in args.lambdas.split(",")))
    provenance.emit(result, args.json)


if __name__ == "__main__":
    main()
