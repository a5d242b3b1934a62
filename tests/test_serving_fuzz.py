"""Every request, however malformed, gets a result or a RequestError, and serving goes on; ids
follow the one rule of recsys.data.vocab (the escapes fuzzing found are pinned below)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.serve import Recommendation, Recommender, RequestError
from recsys.serve.requests import FIELDS, FILTER_FIELDS

pytestmark = pytest.mark.e2e

# Bounded so the default suite stays fast; derandomized so CI sees the same examples every run.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


@pytest.fixture(scope="module")
def rec(tiny_run):
    return Recommender.load(tiny_run[0] / "artifacts", warmup=False)


@pytest.fixture(scope="module")
def good(rec):
    """A fixed good request and its answer, asked again after every fuzzed one."""
    request = {"user_id": rec.artifacts.users.ids[0].item(), "k": 5, "ordering": "mmr"}
    return request, rec.recommend(**request).items


def ids_of(rec):
    a = rec.artifacts
    return [x.item() for x in a.users.ids[:3]] + [x.item() for x in a.items.ids[:3]]


def values(rec) -> st.SearchStrategy:
    """Anything a caller might put in a field: good values, near misses and junk, nested."""
    known = ids_of(rec)
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 40), st.integers(),
        st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**400, np.int64(3),
                         np.uint64(2**64 - 1), np.float64("nan"), np.bool_(True)]),
        st.floats(), st.sampled_from([1e19, -1e19, 1.5e9, 0.0, 0.5]),
        st.text(max_size=6), st.binary(max_size=3),
        st.sampled_from(known + [str(x) for x in known] + [f" {x} " for x in known]
                        + [f"+{x}" for x in known] + [str(x).translate(FULL_WIDTH) for x in known]
                        + ["01", "1_0", "\u0661", "1\x00", "topk", "mmr", "explore"]
                        + list(rec.genre_names)),
    )
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.sampled_from(FILTER_FIELDS), st.text(max_size=4)), inner,
                        max_size=3)), max_leaves=6)


def good_values(rec) -> dict:
    """Per field, values that pass (ids may still be unknown or near misses)."""
    item_ids = st.sampled_from([x.item() for x in rec.artifacts.items.ids[:30]] + ids_of(rec)
                               + ["no-such-item", " 1 ", "+1", "１"])
    genres = st.lists(st.sampled_from(rec.genre_names), max_size=3)
    return {
        "user_id": st.sampled_from(ids_of(rec) + [str(x) for x in ids_of(rec)] + ["nobody"]),
        "history": st.lists(item_ids, max_size=8), "exclude": st.lists(item_ids, max_size=4),
        "k": st.integers(1, 30), "exclude_seen": st.booleans(),
        "filters": st.fixed_dictionaries({}, optional={
            "genres_not": genres, "genres_any": genres, "year_min": st.integers(1900, 2030),
            "year_max": st.integers(1900, 2030)}),
        "time": st.one_of(st.integers(0, 2 * 10**9), st.floats(0, 2e9)),
        "ordering": st.sampled_from(["topk", "mmr", "explore"]),
        "mmr_lambda": st.floats(0, 1), "genre_cap": st.integers(0, 5),
        "temperature": st.floats(0.01, 10), "seed": st.integers(0, 2**63 - 1)}


def requests(rec, keys: st.SearchStrategy) -> st.SearchStrategy:
    """Good requests, good requests with one field replaced by anything, and pure junk."""
    good = st.fixed_dictionaries({}, optional=good_values(rec))
    one_bad = st.builds(lambda r, key, value: {**r, key: value}, good, keys, values(rec))
    return st.one_of(good, one_bad, st.dictionaries(keys, values(rec), max_size=4))


def check(result, request) -> None:
    assert isinstance(result, Recommendation)
    k = request.get("k")
    assert len(result.items) == len(result.scores) <= (10 if k is None else k)
    assert all(np.isfinite(result.scores)) and isinstance(result.unknown_ids, list)


def test_any_single_request_is_answered_or_refused_by_name(rec, good):
    answered = []

    @FUZZ
    @given(request=requests(rec, st.sampled_from(FIELDS)))
    def run(request):
        try:
            check(rec.recommend(**request), request)
            answered.append(request)
        except RequestError as e:
            assert e.field in FIELDS or e.field.startswith("filters")
        assert rec.recommend(**good[0]).items == good[1]

    run()
    assert len(answered) >= 10, "the fuzzing should reach the stages, not only the parser"


def test_any_batch_is_answered_or_refused_by_name(rec, good):
    batch = st.one_of(st.lists(requests(rec, st.one_of(st.sampled_from(FIELDS), st.text(max_size=3))),
                               max_size=4),
                      values(rec))

    answered = []

    @FUZZ
    @given(batch=batch)
    def run(batch):
        try:
            out = rec.recommend_batch(batch)
            assert len(out) == len(batch)
            for result, request in zip(out, batch):
                check(result, request)
            answered.extend(out)
        except RequestError:
            pass
        assert rec.recommend_batch([good[0]])[0].items == good[1]

    run()
    assert len(answered) >= 10, "the fuzzing should reach the stages, not only the parser"


# ---- the escapes fuzzing found (issue 12) ------------------------------------------------------

@pytest.mark.parametrize("request_, field", [
    ({"time": 1e19}, "time"), ({"time": -1e19}, "time"), ({"time": 10**400}, "time"),
    ({"filters": {"year_min": 2**63}}, "filters.year_min"),
    ({"filters": {"year_max": 2**63}}, "filters.year_max"),
    ({"filters": {"year_max": 2**64}}, "filters.year_max"),
    ({"k": 2**63}, "k"), ({"genre_cap": 2**63}, "genre_cap"), ({"seed": 2**64}, "seed"),
    ({"mmr_lambda": 10**400}, "mmr_lambda"), ({"ordering": ["mmr"]}, "ordering"),
    ({"genre_cap": np.array([1, 2])}, "genre_cap"), ({"history": np.array(5)}, "history"),
])
def test_out_of_range_numbers_are_request_errors_not_overflows(rec, request_, field):
    with pytest.raises(RequestError) as err:
        rec.recommend_batch([request_])
    assert err.value.field == field


@pytest.mark.parametrize("variant", [" {} ", "+{}", "0{}", "{} ", "full-width"])
def test_non_canonical_ids_are_unknown_never_mapped(rec, variant):
    item = rec.artifacts.items.ids[0].item()
    user = rec.artifacts.users.ids[0].item()

    def spell(x):
        return str(x).translate(FULL_WIDTH) if variant == "full-width" else variant.format(x)

    # A history of only a near miss is no history: cold start, reported.
    out = rec.recommend(history=[spell(item)], k=5)
    assert out.cold_start and out.unknown_ids == [spell(item)]
    assert out.items == rec.recommend(history=["no-such-item"], k=5).items
    # The same for the user id, and an exclusion names the id it could not apply.
    out = rec.recommend(user_id=spell(user), k=5)
    assert out.cold_start and out.unknown_ids == [spell(user)]
    assert rec.recommend(user_id=user, exclude=[spell(item)], k=5).unknown_ids == [spell(item)]
    # The canonical string is the int.
    assert (rec.recommend(history=[str(item)], k=5).items
            == rec.recommend(history=[item], k=5).items)
    assert not rec.recommend(history=[str(item)], k=5).cold_start
