"""The four serving stages on the tiny pipeline's artifacts: rules, policies, no recompiles, threads."""

import concurrent.futures
import shutil

import jax
import numpy as np
import pytest

from recsys.artifacts import ArtifactError
from recsys.config import ConfigError
from recsys.serve import Recommender, RequestError
from recsys.serve.requests import FIELDS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rec(tiny_run):
    return Recommender.load(tiny_run[0] / "artifacts")


def seen_of(rec, user):
    row = rec.artifacts.users.lookup([user])[0]
    rows = rec.artifacts.history_items[rec.artifacts.history_offsets[row]:rec.artifacts.history_offsets[row + 1]]
    return rec.artifacts.items.raw(rows).tolist()


def users(rec, n):
    return [u.item() for u in rec.artifacts.users.ids[:n]]


def test_known_and_new_users_get_unseen_items_with_stage_timings(rec):
    user = users(rec, 6)[5]
    seen = seen_of(rec, user)
    out = rec.recommend(user_id=str(user), k=10)
    assert len(out.items) == 10 and not set(out.items) & set(seen)
    assert out.scores == sorted(out.scores, reverse=True)
    assert {"retrieval", "filtering", "scoring", "ordering", "total"} <= set(out.timings)
    assert out.titles and len(out.titles) == 10 and not out.cold_start
    # A new user from a history, with an unknown id reported, and an explicit exclusion.
    new = rec.recommend(history=seen[:3] + ["no-such-item"], k=5, exclude=[out.items[0]])
    assert new.unknown_ids == ["no-such-item"] and len(new.items) == 5
    assert not set(new.items) & set(seen[:3]) and out.items[0] not in new.items
    batch = rec.recommend_batch([{"user_id": user, "k": 10}, {"history": seen[:2], "k": 4}])
    assert batch[0].items == out.items and len(batch[1].items) == 4


def test_cold_start_serves_popular_items_through_the_same_rules(rec):
    # The N = num_candidates most popular items once the 2 excluded ones are dropped.
    popular = rec.artifacts.items.raw(rec.retriever.popular[:rec.num_candidates + 2]).tolist()
    cold = rec.recommend(user_id="nobody", k=5, exclude=popular[:2])
    assert cold.cold_start and cold.unknown_ids == ["nobody"] and len(cold.items) == 5
    assert set(cold.items) <= set(popular) and not set(cold.items) & set(popular[:2])
    only_unknown = rec.recommend(history=["x1", "x2"], k=3)
    assert only_unknown.cold_start and only_unknown.unknown_ids == ["x1", "x2"]
    assert len(only_unknown.items) == 3


def test_filters_and_availability_never_serve_a_banned_item(rec, tiny_run):
    genres = list(rec.genre_names)
    col = {g: i for i, g in enumerate(genres)}
    for user in users(rec, 8):
        out = rec.recommend(user_id=user, k=10, filters={"genres_not": genres[:2]})
        rows = rec.artifacts.items.lookup(out.items)
        assert out.items and not rec.artifacts.item_genres[rows][:, [col[genres[0]], col[genres[1]]]].any()
        out = rec.recommend(user_id=user, k=10, filters={"genres_any": [genres[3]]})
        assert rec.artifacts.item_genres[rec.artifacts.items.lookup(out.items), col[genres[3]]].all()
    mid = int(np.median(rec.artifacts.item_year[rec.artifacts.item_year > 0]))
    year = 1900 + 5 * (mid - 1)  # the first year of a middle bucket
    out = rec.recommend(user_id=users(rec, 1)[0], k=10, filters={"year_min": year})
    assert (rec.artifacts.item_year[rec.artifacts.items.lookup(out.items)] >= mid).all()
    # Year bounds compare release years exactly, not their 5-year buckets.
    release = rec.artifacts.item_release_year
    single = int(np.median(release[release > 0]))
    assert len(set(release[(release > 0) & (rec.artifacts.item_year == rec.artifacts.item_year[
        np.flatnonzero(release == single)[0]])])) > 1, "the bucket should hold other years"
    for user in users(rec, 4):
        out = rec.recommend(user_id=user, k=5, filters={"year_min": single, "year_max": single})
        assert out.items and (release[rec.artifacts.items.lookup(out.items)] == single).all()
    # Unavailable items disappear for every request, and come back.
    user = users(rec, 3)[2]
    before = rec.recommend(user_id=user, k=10).items
    assert rec.set_available(before[:5] + ["no-such-item"], False) == ["no-such-item"]
    during = rec.recommend(user_id=user, k=10).items
    assert not set(during) & set(before[:5]) and len(during) == 10
    rec.set_available(before[:5], True)
    assert rec.recommend(user_id=user, k=10).items == before
    # Config-level rules apply to every request.
    strict = Recommender.load(tiny_run[0] / "artifacts", warmup=False,
                              filter_genres_not=(genres[0],))
    rows = strict.artifacts.items.lookup(strict.recommend(user_id=user, k=10).items)
    assert not strict.artifacts.item_genres[rows, col[genres[0]]].any()


def test_mmr_caps_and_exploration(rec):
    from recsys.eval.metrics import intra_list_diversity
    us = users(rec, 40)

    def lists(**opts):
        return np.array([rec.artifacts.items.lookup(rec.recommend(user_id=u, k=10, **opts).items)
                         for u in us])

    top = lists()
    mmr = lists(ordering="mmr", mmr_lambda=0.2)
    assert intra_list_diversity(mmr, rec.artifacts.item_genres) > intra_list_diversity(top, rec.artifacts.item_genres)
    np.testing.assert_array_equal(lists(ordering="mmr", mmr_lambda=1.0), top)
    for u in us:  # a cap may leave fewer than k items; never more than 2 of a genre
        rows = rec.artifacts.items.lookup(rec.recommend(user_id=u, k=10, genre_cap=2).items)
        assert len(rows) and (rec.artifacts.item_genres[rows].sum(0) <= 2).all()
    a = lists(ordering="explore", temperature=5.0, seed=1)
    np.testing.assert_array_equal(a, lists(ordering="explore", temperature=5.0, seed=1))
    assert (a != lists(ordering="explore", temperature=5.0, seed=2)).any()
    assert (a != top).any()


def test_extra_sources_add_item_neighbours_and_popular_items(tiny_run):
    art = tiny_run[0] / "artifacts"
    rec = Recommender.load(art, warmup=False, num_candidates=4, recent_items=1,
                           neighbours_per_item=4)
    item = rec.artifacts.items.raw([7])[0].item()
    v = rec.artifacts.item_vectors
    near = np.argsort(-(v @ v[7]))
    near = [r for r in near if r not in (0, 7)][:4]
    out = rec.recommend(history=[item], k=4)
    assert set(rec.artifacts.items.lookup(out.items)) <= set(near)
    pop = Recommender.load(art, warmup=False, num_candidates=3, popular_candidates=3)
    out = pop.recommend(user_id=users(pop, 1)[0], k=3, exclude_seen=False)
    assert set(pop.artifacts.items.lookup(out.items)) == set(pop.retriever.popular[:3])


def test_scores_from_inputs_built_in_jit_equal_those_from_host_inputs(rec):
    # Serving computes the ranker's inputs inside its jitted call; training builds them in numpy
    # (recsys.models.ranker_inputs.ranker_inputs): the trained ranker must score alike.
    from recsys.models.ranker_inputs import ranker_inputs
    from recsys.serve.artifacts import ranker_tables
    s, a = rec._stages, rec.artifacts
    host_tables = ranker_tables(a)
    t_last = int(a.history_times.max())
    reqs = [s.parser.parse(r) for r in
            [{"user_id": u, "time": float(t_last - i * 86_400 * 3 + i)}
             for i, u in enumerate(users(rec, 40))]
            + [{"history": seen_of(rec, u)[:5]} for u in users(rec, 5)] + [{"user_id": "nobody"}]]
    hist = s.retriever.histories(reqs)
    q = s.retriever.request_vectors(reqs, hist)
    depth = np.asarray([s.retriever.depth(r) for r in reqs])
    cand = s.retriever.first_allowed(reqs, s.retriever.search(reqs, q, hist, depth),
                                     s.filter.first_allowed)
    got = s.scorer.score(reqs, q, hist, cand)
    x = ranker_inputs(host_tables, q, [r.user_row for r in reqs], hist,
                      np.asarray([r.time for r in reqs], np.int64),
                      np.asarray([r.last_time for r in reqs], np.int64), np.maximum(cand, 0))
    want = np.where(cand > 0, np.asarray(a.ranker_fn(a.ranker_params, x)), -np.inf)
    assert (cand > 0).sum() > 40 * rec.num_candidates // 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_batch_gets_what_each_request_gets_alone(rec):
    us = users(rec, 30)
    genres = list(rec.genre_names)
    catalogue = rec.artifacts.items.raw(np.arange(1, len(rec.artifacts.item_vectors))).tolist()
    reqs = [{"user_id": u, "k": 10} for u in us[:20]]
    reqs[3]["exclude"] = catalogue[:250]  # one heavy request: it alone searches deep
    reqs[5]["filters"] = {"genres_any": [genres[-1]], "year_min": 2000}  # refetches
    reqs[7].update(ordering="mmr", genre_cap=2)
    reqs += [{"history": seen_of(rec, u)[:4], "k": 5} for u in us[20:25]]
    reqs += [{"user_id": "nobody", "k": 3}, {"user_id": us[0], "exclude_seen": False}]
    alone = [rec.recommend(**r) for r in reqs]
    together = rec.recommend_batch(reqs)
    assert [r.items for r in together] == [r.items for r in alone]
    for t, a in zip(together, alone):
        np.testing.assert_allclose(t.scores, a.scores, rtol=1e-5, atol=1e-5)


def test_each_request_searches_to_its_own_depth(rec, monkeypatch):
    calls = []
    searcher = rec.artifacts.searcher

    class Spy:
        def search(self, q, k):
            calls.append((len(q), k))
            return searcher.search(q, k)

    monkeypatch.setattr(rec.artifacts, "searcher", Spy())
    light, heavy = users(rec, 2)
    catalogue = rec.artifacts.items.raw(np.arange(1, len(rec.artifacts.item_vectors))).tolist()
    exclude = [i for i in catalogue if i not in seen_of(rec, heavy)][:300]
    rec.recommend_batch([{"user_id": light}, {"user_id": heavy, "exclude": exclude}])
    n, rows = rec.num_candidates, len(rec.artifacts.item_vectors) - 1

    def depth(extra):  # N + its own seen and excluded items, rounded up to a power of two
        return min(n + (1 << (extra - 1).bit_length()), rows)

    assert sorted(calls) == sorted([(1, depth(len(seen_of(rec, light)))),
                                    (1, depth(len(seen_of(rec, heavy)) + 300))])
    assert depth(len(seen_of(rec, light))) < n + 300


def test_no_compilation_after_warmup_over_varied_requests(rec):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    us = users(rec, 50)
    rng = np.random.default_rng(0)
    genres = list(rec.genre_names)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for i in range(100):
            req = {"user_id": us[i % 50], "k": int(rng.integers(1, 30))}
            if i % 3 == 1:
                req = {"history": seen_of(rec, us[i % 50])[: int(rng.integers(0, 30))], "k": 5}
            if i % 4 == 2:
                req["filters"] = {"genres_not": genres[: i % 3 + 1], "year_min": 1990}
            if i % 5 == 3:
                req["ordering"] = ["mmr", "explore"][i % 2]
                req["exclude"] = seen_of(rec, us[0])[:3]
            rec.recommend(**req)
        for b in (2, 7, 20, 65, 300):
            rec.recommend_batch([{"user_id": u, "k": 10} for u in (us * 6)[:b]])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_many_threads_get_the_same_answers_as_one(rec):
    reqs = [{"user_id": u, "k": 10, "exclude": [], "ordering": "mmr" if i % 2 else "topk"}
            for i, u in enumerate(users(rec, 30))]
    expected = [rec.recommend(**r).items for r in reqs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda r: rec.recommend(**r).items, reqs * 3))
    assert got == expected * 3


@pytest.mark.parametrize("kwargs, field", [
    ({"k": 0}, "k"), ({"k": "3"}, "k"), ({"k": 2.0}, "k"), ({"k": True}, "k"),
    ({"user_id": 1.5}, "user_id"), ({"user_id": float("nan")}, "user_id"),
    ({"user_id": np.float64("nan")}, "user_id"), ({"history": "12"}, "history"),
    ({"history": [None]}, "history"), ({"exclude": 5}, "exclude"), ({"exclude": "5"}, "exclude"),
    ({"filters": {"colour": "red"}}, "filters.colour"), ({"filters": ["x"]}, "filters"),
    ({"filters": {"genres_not": ["no-such-genre"]}}, "filters.genres_not"),
    ({"filters": {"year_min": "1990"}}, "filters.year_min"), ({"ordering": "best"}, "ordering"),
    ({"mmr_lambda": 1.5}, "mmr_lambda"), ({"temperature": 0}, "temperature"),
    ({"time": float("nan")}, "time"), ({"exclude_seen": "yes"}, "exclude_seen"),
    ({"colour": 1}, "colour"),
])
def test_bad_requests_name_the_field_and_serving_continues(rec, kwargs, field):
    calls = [lambda: rec.recommend_batch([kwargs])]
    if set(kwargs) <= set(FIELDS):  # an unknown keyword of recommend() is Python's TypeError
        calls.append(lambda: rec.recommend(**kwargs))
    for call in calls:
        with pytest.raises(RequestError) as err:
            call()
        assert err.value.field == field and isinstance(err.value, ValueError)
    assert len(rec.recommend(history=[], k=2).items) == 2
    assert set(FIELDS) >= {"user_id", "history", "k", "exclude", "filters"}


@pytest.mark.parametrize("option, value", [
    ("ordering", "bogus"), ("mmr_lambda", 5), ("mmr_lambda", float("nan")), ("mmr_lambda", "0.5"),
    ("genre_cap", -3), ("genre_cap", 2**40), ("genre_cap", 2.0), ("explore_temperature", 0),
    ("explore_temperature", 10**400), ("num_candidates", 0), ("num_candidates", True),
    ("mmr_similarity", "words"), ("exclude_seen", "no"), ("filter_genres_not", ("no-such-genre",)),
    ("filter_genres_any", "Drama"), ("filter_year_min", 2**63), ("no_such_option", 1),
])
def test_bad_load_options_are_refused_at_load_naming_the_field(tiny_run, option, value):
    with pytest.raises(ConfigError, match=rf"^serve\.{option}\b"):
        Recommender.load(tiny_run[0] / "artifacts", warmup=False, **{option: value})
    assert issubclass(ConfigError, ValueError)


def test_load_options_of_the_right_type_are_taken(tiny_run):
    rec = Recommender.load(tiny_run[0] / "artifacts", warmup=False, num_candidates=np.int64(50),
                           mmr_lambda=1, filter_genres_any=["Genre-0"], filter_year_min=1990)
    assert rec.cfg.num_candidates == 50 and rec.cfg.mmr_lambda == 1.0
    assert rec.cfg.filter_genres_any == ("Genre-0",) and rec.num_candidates == 50


def test_stored_json_filters_of_older_artifacts_are_refused_not_dropped():
    from recsys.serve.requests import serve_config
    with pytest.raises(ConfigError, match="serve.filters"):
        serve_config({"filters": '{"year_min": 1990}'}, {})
    assert serve_config({"filters": "", "genre_cap": 2}, {}).genre_cap == 2


def test_partial_or_corrupt_artifacts_are_refused(tiny_run, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(tiny_run[0] / "artifacts", copy, symlinks=True)
    files = next(copy.rglob("manifest.json")).parent  # the root, or the version it points to
    ranker = (files / "ranker.jax").read_bytes()
    (files / "ranker.jax").unlink()
    with pytest.raises(ArtifactError, match="ranker.jax is missing"):
        Recommender.load(copy)
    (files / "item_vectors.npy").write_bytes(b"garbage")
    (files / "ranker.jax").write_bytes(ranker)
    with pytest.raises(ArtifactError, match="item_vectors.npy"):
        Recommender.load(copy)
    (files / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json"):
        Recommender.load(copy)


def test_artifacts_without_release_years_filter_by_year_bucket(rec):
    # Artifacts written before release years were exported keep working, at bucket resolution.
    from recsys.data.dataset import year_bucket
    from recsys.serve import filtering
    user = users(rec, 1)[0]
    req = rec.parser.parse({"user_id": user, "filters": {"year_min": 1991, "year_max": 1993}})
    cand = np.arange(1, len(rec.artifacts.item_vectors))[None, :]
    art = rec.artifacts
    args = (cand, rec.filter.availability.mask, art.item_genres, art.item_year, rec.genre_names)
    by_bucket = filtering.allowed([req], *args)[0]
    exact = filtering.allowed([req], *args, rec.artifacts.item_release_year)[0]
    bucket = year_bucket(1991)
    assert (rec.artifacts.item_year[cand[0][by_bucket]] == bucket).all()
    assert ((rec.artifacts.item_release_year[cand[0][exact]] >= 1991)
            & (rec.artifacts.item_release_year[cand[0][exact]] <= 1993)).all()
    assert exact.sum() < by_bucket.sum()
