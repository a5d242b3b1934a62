"""Mined hard negatives (rank band, false-negative filters) and exact resumption with extra negatives."""

import dataclasses
import pathlib
import shutil

import jax
import numpy as np
import pytest

from recsys import config as config_lib
from recsys import pipeline, sharding
from recsys.train import mining, negatives
from recsys.train.loop import train_retrieval

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _reference_band(q, items, positive, known, lo, hi, margin):
    """Per row, the set of allowed band items by brute force (ranking ties by row, lowest first)."""
    out = []
    for i in range(len(q)):
        scores = items[1:] @ q[i]
        order = np.lexsort((np.arange(1, len(items)), -scores)) + 1
        pos_score = items[positive[i]] @ q[i]
        out.append({int(j) for j in order[lo:hi]
                    if j not in known[i] and items[j] @ q[i] <= pos_score - margin})
    return out


def test_sample_band_matches_brute_force_filters():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 5)).astype(np.float32)
    items = rng.standard_normal((40, 5)).astype(np.float32)
    items[0] = 0
    positive = rng.integers(1, 40, 6)
    known = [set(rng.choice(np.arange(1, 40), 8, replace=False).tolist()) | {int(p)}
             for p in positive]
    order = np.argsort(-(q @ items[1:].T), axis=1, kind="stable") + 1
    scores = np.take_along_axis(q @ items.T, order, axis=1)
    pos_score = np.einsum("pd,pd->p", q, items[positive])
    lo, hi, num, margin = 3, 20, 4, 0.1
    got, log_q = mining.sample_band(
        scores, order, pos_score,
        lambda rows: np.array([[r in known[i] for r in row] for i, row in enumerate(rows)]),
        ranks=(lo, hi), num=num, margin=margin, rng=np.random.default_rng(1))
    want = _reference_band(q, items, positive, known, lo, hi, margin)
    assert got.shape == (6, num) and got.dtype == np.int32
    for i in range(6):
        drawn = [int(x) for x in got[i] if x > 0]
        assert len(drawn) == min(num, len(want[i])) and len(set(drawn)) == len(drawn)
        assert set(drawn) <= want[i]
        assert not set(drawn) & known[i]  # never the user's own items
        if want[i]:
            np.testing.assert_allclose(log_q[i], -np.log(len(want[i])), rtol=1e-6)


def test_sample_band_is_seeded_and_uniform_within_the_band():
    rows = np.tile(np.arange(1, 11), (2000, 1))
    scores = np.tile(np.linspace(1, 0, 10, dtype=np.float32), (2000, 1))
    args = {"ranks": (2, 8), "num": 2, "margin": 0.0}

    def never(rows):
        return np.zeros(rows.shape, bool)

    a, _ = mining.sample_band(scores, rows, np.full(2000, 5.0), never, rng=np.random.default_rng(3),
                              **args)
    b, _ = mining.sample_band(scores, rows, np.full(2000, 5.0), never, rng=np.random.default_rng(3),
                              **args)
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(a.ravel(), minlength=11)
    assert counts[[1, 2, 9, 10]].sum() == 0  # outside ranks 2..7
    np.testing.assert_allclose(counts[3:9] / counts.sum(), 1 / 6, atol=0.02)


def test_uniform_negatives_depend_only_on_seed_and_step():
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    ds = pipeline.load_data(cfg.data)
    a, a_log_q = negatives.uniform(ds.features, ds.num_items, 32, seed=0, step=5)
    b, _ = negatives.uniform(ds.features, ds.num_items, 32, seed=0, step=5)
    c, _ = negatives.uniform(ds.features, ds.num_items, 32, seed=0, step=6)
    np.testing.assert_array_equal(a["item"], b["item"])
    assert not np.array_equal(a["item"], c["item"])
    assert a["item"].min() >= 1 and a["item"].max() <= ds.num_items
    assert a["item_genres"].shape == (32, ds.features.item_genres.shape[1])
    np.testing.assert_allclose(a_log_q, -np.log(ds.num_items))


def _tiny(**train):
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    train = {"uniform_negatives": 16, "mined_negatives": 3,
             "hard_negatives": 40, "mine_ranks": (2, 30), "optimizer": "adagrad",
             "mine_margin": -2.0, **train}  # cosines differ by at most 2: no margin filter
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train),
                               ranker=dataclasses.replace(cfg.ranker, steps=0))


def test_mined_table_skips_known_items_and_resume_is_exact(tmp_path):
    # The streaming logQ estimate rides in the state beside (model, optimizer): resumed with it.
    cfg = _tiny(num_steps=12, checkpoint_every=6, logq_estimate="streaming")
    ds = pipeline.load_data(cfg.data)
    # One device: exactness does not depend on the mesh, and it compiles twice as fast.
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    positions = ds.train_positions(cfg.data.trained_on)
    # About 85 steps per epoch: re-mine every 4 steps.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, mine_every_epochs=4 * cfg.train.batch_size / len(positions)))
    straight = train_retrieval(cfg, ds, tmp_path / "straight", mesh)
    saved = sorted(p.name for p in (tmp_path / "straight" / "checkpoints" / "mined").iterdir())
    assert saved == ["mined-4.npz", "mined-8.npz"]
    with np.load(tmp_path / "straight" / "checkpoints" / "mined" / "mined-8.npz") as table:
        items_PxH = table["items"]
    assert (items_PxH > 0).mean() > 0.5
    users_P = ds.seq_users[positions]
    own = {(int(u), int(i)) for u, i in zip(users_P, ds.seq_items[positions])}
    assert not any((int(u), int(i)) in own for u, row in zip(users_P, items_PxH) for i in row)

    # A run stopped at its step-6 checkpoint (between two refreshes) and resumed to 12 ends in
    # the same state as the run that never stopped.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "retrieval" / "12")
    (tmp_path / "resumed" / "checkpoints" / "mined" / "mined-8.npz").unlink()
    resumed = train_retrieval(cfg, ds, tmp_path / "resumed", mesh)
    assert resumed.metrics["train/steps"] == 12
    assert np.asarray(resumed.state[2]["logq"]["sightings"][...]).sum() == 12 * cfg.train.batch_size
    for a, b in zip(_leaves(straight.state), _leaves(resumed.state)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _leaves(state):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("bad, message", [
    ({"mined_negatives": 5, "mine_ranks": (10, 12)}, "fewer than"),
    ({"mined_negatives": 2, "mine_ranks": (10, 5)}, "lo < hi"),
    ({"uniform_negatives": -1}, "uniform_negatives"),
    ({"mined_correction": "nope"}, "mined_correction"),
])
def test_bad_negative_settings_name_the_field(bad, message):
    with pytest.raises(config_lib.ConfigError, match=message):  # TrainConfig checks its fields
        config_lib.validate(_tiny(**bad))


def test_mine_stride_groups_consecutive_events_of_one_user(tmp_path):
    cfg = _tiny(mine_stride=3)
    ds = pipeline.load_data(cfg.data)
    positions = ds.train_positions(cfg.data.trained_on)
    table = mining.MinedNegatives(ds, positions, cfg.train, tmp_path)
    rep_P = positions[table.queries][table.query_of_P]
    users = ds.seq_users
    assert (users[rep_P] == users[positions]).all()  # a user's own query
    assert ((positions - rep_P >= 0) & (positions - rep_P < 3)).all()  # at or just before
    assert len(positions) / 3 <= len(table.queries) < len(positions) / 3 + ds.num_users
