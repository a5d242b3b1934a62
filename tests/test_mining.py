"""Mined hard negatives: rank band and false-negative filters, the same tables as the sort-based
refresh, a schedule that is a pure function of the step (with or without the background thread,
resumed anywhere, also inside the lag window), and exact resumption with extra negatives."""

import dataclasses
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from recsys import config as config_lib
from recsys import pipeline, sharding
from recsys.eval import protocol, ranking
from recsys.models.two_tower import TwoTower
from recsys.train import mining, negatives
from recsys.train.loop import train_retrieval, vocabularies

ROOT = pathlib.Path(__file__).resolve().parents[1]


def with_fields(tc, **fields):
    return dataclasses.replace(tc, **fields)


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


def _never(rows):
    return np.zeros(rows.shape, bool)


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
        scores, order,
        lambda rows: np.array([[r in known[i] for r in row] for i, row in enumerate(rows)]),
        np.arange(6), pos_score, ranks=(lo, hi), num=num, margin=margin,
        rng=np.random.default_rng(1))
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
    every = np.arange(2000)
    a, _ = mining.sample_band(scores, rows, _never, every, np.full(2000, 5.0),
                              rng=np.random.default_rng(3), **args)
    b, _ = mining.sample_band(scores, rows, _never, every, np.full(2000, 5.0),
                              rng=np.random.default_rng(3), **args)
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(a.ravel(), minlength=11)
    assert counts[[1, 2, 9, 10]].sum() == 0  # outside ranks 2..7
    np.testing.assert_allclose(counts[3:9] / counts.sum(), 1 / 6, atol=0.02)


def _sort_based_sample_band(scores_PxK, rows_PxK, positive_score_P, known_P_fn, *, ranks, num,
                            margin, rng):
    """The sampler before it shared query rows and partitioned: one row per position, a full
    argsort of the keys (the reference the faster one must reproduce draw for draw)."""
    lo, hi = ranks
    band_PxB, band_scores_PxB = rows_PxK[:, lo:hi], scores_PxK[:, lo:hi]
    ok_PxB = (band_PxB > 0) & (band_scores_PxB <= positive_score_P[:, None] - margin)
    ok_PxB &= ~known_P_fn(np.maximum(band_PxB, 0))
    keys_PxB = np.where(ok_PxB, rng.random(ok_PxB.shape), np.inf)
    pick_PxN = np.argsort(keys_PxB, axis=1)[:, :num]
    items_PxN = np.take_along_axis(band_PxB, pick_PxN, axis=1)
    items_PxN = np.where(np.take_along_axis(ok_PxB, pick_PxN, axis=1), items_PxN, 0)
    left_P = ok_PxB.sum(axis=1)
    log_q_P = np.where(left_P > 0, -np.log(np.maximum(left_P, 1)), 0.0)
    return items_PxN.astype(np.int32), log_q_P.astype(np.float32)


@pytest.mark.parametrize("num", [3, 9])  # partitioned draw, and a draw of the whole band
def test_shared_query_rows_draw_what_one_row_per_position_drew(num):
    rng = np.random.default_rng(5)
    r, k, p = 7, 12, 30
    scores = -np.sort(-rng.standard_normal((r, k)).astype(np.float32), axis=1)
    rows = rng.integers(-1, 50, (r, k))
    row_of_P = np.sort(rng.integers(0, r, p))
    user_R = rng.integers(0, 3, r)
    known_users = {(int(u), int(i)) for u in range(3) for i in rng.integers(1, 50, 10)}

    def known(user_of_rows):
        return lambda rows_XxB: np.array([[(int(u), int(i)) in known_users for i in row]
                                          for u, row in zip(user_of_rows, rows_XxB)])

    pos = rng.standard_normal(p).astype(np.float32)
    args = {"ranks": (2, 11), "num": num, "margin": 0.1}
    got = mining.sample_band(scores, rows, known(user_R), row_of_P, pos,
                             rng=np.random.default_rng(9), **args)
    want = _sort_based_sample_band(scores[row_of_P], rows[row_of_P], pos,
                                   known(user_R[row_of_P]), rng=np.random.default_rng(9), **args)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


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
    return dataclasses.replace(cfg, train=with_fields(cfg.train, **train),
                               ranker=dataclasses.replace(cfg.ranker, steps=0))


# ---- the miner on its own: models standing in for the training state of each step ----------

@pytest.fixture(scope="module")
def tiny_data():
    cfg = _tiny()
    ds = pipeline.load_data(cfg.data)
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    return cfg, ds, ds.train_positions(cfg.data.trained_on), mesh


def _model(cfg, ds, mesh, step):
    """A different model per step (the state a run holds before step `step` trains)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        model = TwoTower(cfg.model, vocabularies(ds), nnx.Rngs(100 + step))
    model.eval()
    return model


def _miner(tiny_data, directory, *, period=4, background=True, **train):
    cfg, ds, positions, _ = tiny_data
    tc = with_fields(cfg.train, mine_every_epochs=period * cfg.train.batch_size / len(positions),
                     **train)
    miner = mining.MinedNegatives(ds, positions, tc, directory, background=background)
    assert miner.period == period
    return miner


def _run(tiny_data, miner, start, stop, *, donate=False):
    """Drives the miner as the loop does from `start` to `stop`; the tables each step read."""
    cfg, ds, positions, mesh = tiny_data
    seen = {}
    with jax.set_mesh(mesh):
        miner.restore(_model(cfg, ds, mesh, start), start)
        for step in range(start, stop):
            model = _model(cfg, ds, mesh, step)
            miner.begin(step, model)
            if donate:  # the train step donates the state right after begin dispatched on it
                state = nnx.state(model, nnx.Param)
                jax.jit(lambda s: jax.tree.map(lambda a: a * 0, s), donate_argnums=0)(state)
                assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
            items, log_q, vectors = miner.at(step, positions)
            seen[step] = (items, log_q, vectors)
        miner.flush()  # what the loop does before a checkpoint
    return seen


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for step in a:
        for x, y in zip(a[step], b[step]):
            if x is None or y is None:
                assert x is None and y is None
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"step {step}")


def test_refresh_draws_what_the_sort_based_refresh_drew(tiny_data, tmp_path):
    cfg, ds, positions, mesh = tiny_data
    miner = _miner(tiny_data, tmp_path, mine_lag=0.0, mine_stride=3)
    model = _model(cfg, ds, mesh, 4)
    with jax.set_mesh(mesh):
        miner.restore(model, 0)
        miner.begin(4, model)
        items, log_q, _ = miner.at(4, positions)
        # The refresh as it was: vectors from the evaluation protocol, an exact top-k and the
        # sort-based sampler with one row per position.
        tc = miner.cfg
        q = protocol.query_vectors(model, ds, positions[miner.queries])[miner.query_of_P]
        items_VxD = protocol.item_vectors(model, ds.features)
    hi = tc.mine_ranks[1]
    scores, rows = ranking.exact_topk(q, items_VxD, hi)
    users = ds.seq_users[positions].astype(np.int64)
    own = set(zip(users.tolist(), ds.seq_items[positions].tolist()))
    want = _sort_based_sample_band(
        scores, rows, np.einsum("pd,pd->p", q, items_VxD[ds.seq_items[positions]]),
        lambda r: np.array([[(int(u), int(i)) in own for i in row] for u, row in zip(users, r)]),
        ranks=tc.mine_ranks, num=tc.mined_negatives, margin=tc.mine_margin,
        rng=np.random.default_rng([tc.seed, 4, 2]))
    np.testing.assert_array_equal(items, want[0])
    np.testing.assert_array_equal(log_q, want[1])
    assert (items > 0).mean() > 0.5


def test_schedule_tables_start_at_the_refresh_step_plus_the_lag(tiny_data, tmp_path):
    miner = _miner(tiny_data, tmp_path, mine_lag=0.5)
    assert miner.lag == 2
    assert [miner.refresh_in_use(s) for s in range(12)] == [0] * 6 + [4] * 4 + [8] * 2
    assert [s for s in range(12) if miner.due(s)] == [4, 8]
    seen = _run(tiny_data, miner, 0, 12)
    assert not any(seen[s][0].any() for s in range(6))  # nothing mined yet: all masked
    assert seen[6][0].any() and np.array_equal(seen[6][0], seen[9][0])
    assert not np.array_equal(seen[9][0], seen[10][0])
    assert sorted(miner.seconds) == [4, 8]
    miner.close()


@pytest.mark.parametrize("mode", ["embed", "cached"])
def test_background_thread_changes_no_table_and_tolerates_donation(tiny_data, tmp_path, mode):
    threaded = _miner(tiny_data, tmp_path / "threaded", mine_lag=0.5, mined_vectors=mode)
    inline = _miner(tiny_data, tmp_path / "inline", mine_lag=0.5, mined_vectors=mode,
                    background=False)
    assert threaded._pool is not None and inline._pool is None
    try:
        _assert_same(_run(tiny_data, threaded, 0, 14, donate=True), _run(tiny_data, inline, 0, 14))
    finally:
        threaded.close()
        inline.close()


@pytest.mark.parametrize("lag, stop_at", [
    (0.0, 6),   # between refreshes (as before the lag existed)
    (0.0, 8),   # at a refresh step: the resumed run mines it itself
    (0.75, 6),  # refresh 4 begun, used only from step 7: read back from its file
    (0.75, 9),  # refresh 8 begun, in use from 11; refresh 4 in use
    (0.75, 11),
])
def test_resume_anywhere_reads_the_tables_an_uninterrupted_run_used(tiny_data, tmp_path, lag,
                                                                    stop_at):
    straight = _miner(tiny_data, tmp_path / "straight", mine_lag=lag, mined_vectors="cached")
    want = _run(tiny_data, straight, 0, 15)
    straight.close()
    first = _miner(tiny_data, tmp_path / "resumed", mine_lag=lag, mined_vectors="cached")
    got = _run(tiny_data, first, 0, stop_at)
    first.close()  # the process stops here (after a checkpoint at stop_at)
    resumed = _miner(tiny_data, tmp_path / "resumed", mine_lag=lag, mined_vectors="cached")
    got.update(_run(tiny_data, resumed, stop_at, 15))
    resumed.close()
    _assert_same(got, want)


def test_a_refresh_error_reaches_the_loop(tiny_data, tmp_path):
    miner = _miner(tiny_data, tmp_path, mine_lag=0.5)
    cfg, ds, positions, mesh = tiny_data
    miner._search = lambda *args: 1 / 0
    with jax.set_mesh(mesh):
        miner.restore(_model(cfg, ds, mesh, 0), 0)
        miner.begin(4, _model(cfg, ds, mesh, 4))
        miner.at(5, positions[:3])  # still the table before it
        with pytest.raises(ZeroDivisionError):
            miner.at(6, positions[:3])
        with pytest.raises(ZeroDivisionError):
            miner.close()


def test_bad_lag_and_vectors_name_the_field(tiny_data, tmp_path):
    for fields, message in (({"mine_lag": 1.0}, "train.mine_lag"),
                            ({"mined_vectors": "both"}, "train.mined_vectors")):
        with pytest.raises(config_lib.ConfigError, match=message):
            _miner(tiny_data, tmp_path, **fields)


# ---- through the training loop ---------------------------------------------------------------

@pytest.mark.parametrize("lag, vectors", [
    (0.0, "embed"),    # synchronous refreshes, mined items embedded in the step (as before)
    (0.75, "cached"),  # the step-6 checkpoint is inside a lag window; cached item vectors
])
def test_mined_table_skips_known_items_and_resume_is_exact(tmp_path, lag, vectors):
    # The streaming logQ estimate rides in the state beside (model, optimizer): resumed with it.
    cfg = _tiny(num_steps=12, checkpoint_every=6, logq_estimate="streaming", mine_lag=lag,
                mined_vectors=vectors)
    ds = pipeline.load_data(cfg.data)
    # One device: exactness does not depend on the mesh, and it compiles twice as fast.
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    positions = ds.train_positions(cfg.data.trained_on)
    # About 85 steps per epoch: re-mine every 4 steps.
    cfg = dataclasses.replace(cfg, train=with_fields(
        cfg.train, mine_every_epochs=4 * cfg.train.batch_size / len(positions)))
    straight = train_retrieval(cfg, ds, tmp_path / "straight", mesh)
    saved = sorted(p.name for p in (tmp_path / "straight" / "checkpoints" / "mined").iterdir())
    assert saved == ["mined-4.npz", "mined-8.npz"]
    with np.load(tmp_path / "straight" / "checkpoints" / "mined" / "mined-8.npz") as table:
        items_PxH = table["items"]
        assert ("vectors" in table) == (vectors == "cached")
    assert (items_PxH > 0).mean() > 0.5
    users_P = ds.seq_users[positions]
    own = {(int(u), int(i)) for u, i in zip(users_P, ds.seq_items[positions])}
    assert not any((int(u), int(i)) in own for u, row in zip(users_P, items_PxH) for i in row)

    # A run stopped at its step-6 checkpoint and resumed to 12 ends in the same state as the run
    # that never stopped (with lag 0.75 refresh 4 is begun but in use only from step 7).
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
    assert (table.query_users == users[positions[table.queries]]).all()
    assert ((positions - rep_P >= 0) & (positions - rep_P < 3)).all()  # at or just before
    assert len(positions) / 3 <= len(table.queries) < len(positions) / 3 + ds.num_users
