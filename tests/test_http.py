"""The HTTP server on loopback, driven by httpx: answers equal to in-process ones, 400s naming the
field, health, Prometheus metrics, the CLI's errors, and a reload under 8 client threads."""

import json
import shutil
import sys
import threading
import time
import traceback

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_reload import own_root, republish

from recsys import artifacts, cli
from recsys.serve import Recommender

http = pytest.importorskip("recsys.serve.http", exc_type=ImportError)  # the http extra

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def root(tiny_run, tmp_path_factory):
    return own_root(tiny_run, tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def server(root):
    """A server loading `root` at startup, as `recsys serve-http` does; yields (service, client)
    once /healthz says it is ready."""
    service = http.Service(root)
    with http.running(service) as url, httpx.Client(base_url=url, timeout=120) as client:
        deadline = time.monotonic() + 300
        while (health := client.get("/healthz")).status_code != 200:
            assert health.status_code == 503 and health.json() == {"status": "loading"}
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.1)
        yield service, client


def users(rec, n):
    return [u.item() for u in rec.artifacts.users.ids[:n]]


def varied_requests(rec):
    u = users(rec, 8)
    items = rec.artifacts.items.ids[:6].tolist()
    genre = rec.genre_names[0]
    return [{"user_id": u[0], "k": 10},
            {"user_id": str(u[1]), "k": 5, "exclude": items[:2]},
            {"history": items[2:5] + ["no-such-item"], "k": 4, "exclude_seen": False},
            {"user_id": "nobody", "k": 3},
            {"user_id": u[2], "k": 6, "ordering": "mmr", "mmr_lambda": 0.3, "genre_cap": 2,
             "filters": {"genres_not": [genre]}},
            {"user_id": u[3], "k": 5, "ordering": "explore", "seed": 7, "temperature": 0.5,
             "time": 1.7e9, "genre_cap": None}]


def answers(rec, reqs) -> list:
    """In-process answers, one request at a time as the HTTP clients send them."""
    return [(r.items, r.scores) for r in (rec.recommend(**req) for req in reqs)]


def as_json(r) -> dict:
    return {"items": r.items, "scores": r.scores, "titles": r.titles, "unknown_ids": r.unknown_ids,
            "cold_start": r.cold_start, "version": r.version}


def without_timings(body: dict) -> dict:
    assert set(body["timings"]) == {"retrieval", "filtering", "scoring", "ordering", "total"}
    return {k: v for k, v in body.items() if k != "timings"}


def samples(client) -> dict:
    """/metrics as {(sample name, sorted label items): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_answers_equal_the_in_process_ones(server):
    service, client = server
    reqs = varied_requests(service.rec)
    # One at a time and as one batch: batches are padded to other shapes, so the last float
    # bits of a score may differ between the two, never between HTTP and in process.
    want = [as_json(service.rec.recommend(**r)) for r in reqs]
    assert want[2]["unknown_ids"] == ["no-such-item"] and want[3]["cold_start"]
    for req, expected in zip(reqs, want):
        response = client.post("/recommend", json=req)
        assert response.status_code == 200, response.text
        assert without_timings(response.json()) == expected
    response = client.post("/recommend_batch", json={"requests": reqs})
    assert response.status_code == 200
    want = [as_json(r) for r in service.rec.recommend_batch(reqs)]
    assert [without_timings(r) for r in response.json()["results"]] == want
    assert client.post("/recommend_batch", json={"requests": []}).json() == {"results": []}


@pytest.mark.parametrize("endpoint,body,field", [
    ("/recommend", {"k": 0}, "k"),
    ("/recommend", {"k": "3"}, "k"),
    ("/recommend", {"k": 2**63}, "k"),
    ("/recommend", {"user_id": 1.5}, "user_id"),
    ("/recommend", {"history": "1,2"}, "history"),
    ("/recommend", {"filters": {"year_min": "1990"}}, "filters.year_min"),
    ("/recommend", {"filters": {"colour": "red"}}, "filters.colour"),
    ("/recommend", {"ordering": "bogus"}, "ordering"),
    ("/recommend", {"time": float("nan")}, "time"),
    ("/recommend", {"no_such_field": 1}, "no_such_field"),
    ("/recommend", [{"k": 1}], "body"),
    ("/recommend", b"{not json", "body"),
    ("/recommend", b"\xff\xfe", "body"),
    ("/recommend_batch", {"requests": "x"}, "requests"),
    ("/recommend_batch", {"requests": [{"k": 1}, 7]}, "requests"),
    ("/recommend_batch", {"requests": [{"k": 1}, {"k": -1}]}, "k"),
    ("/recommend_batch", {"requests": [], "k": 1}, "k"),
    ("/recommend_batch", {}, "requests"),
    ("/recommend_batch", [], "body"),
])
def test_bad_requests_are_400_naming_the_field(server, endpoint, body, field):
    service, client = server
    # json.dumps, not httpx's json=: it writes NaN as Python's json.loads reads it.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(endpoint, content=content)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request" and response.json()["field"] == field
    assert response.json()["message"].startswith(f"{field}: ")
    assert client.post("/recommend", json={"user_id": users(service.rec, 1)[0]}).status_code == 200


def test_a_body_too_large_is_413(server):
    _, client = server
    response = client.post("/recommend", content=b" " * (http.MAX_BODY_BYTES + 1))
    assert response.status_code == 413 and response.json()["field"] == "body"


def test_health_is_503_until_the_artifacts_are_loaded_and_warmed_up(server, root, tmp_path):
    service, client = server
    assert client.get("/healthz").json() == {"status": "ok", "version": service.rec.version}
    unloaded = http.Service(root)
    with http.running(unloaded, load=False) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").status_code == 503
        assert c.get("/healthz").json() == {"status": "loading"}
        for endpoint in ("/recommend", "/recommend_batch", "/admin/reload"):
            response = c.post(endpoint, json={})
            assert response.status_code == 503 and response.json()["error"] == "not_ready"
        assert samples(c)[("recsys_http_errors_total",
                           (("endpoint", "/recommend"), ("kind", "not_ready")))] == 1
    missing = http.Service(tmp_path / "no-artifacts")
    with http.running(missing) as url, httpx.Client(base_url=url, timeout=60) as c:
        deadline = time.monotonic() + 60
        while (health := c.get("/healthz").json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health["status"] == "failed" and "no-artifacts" in health["error"]


def test_metrics_count_requests_errors_and_stage_latencies(server):
    service, client = server
    before = samples(client)
    user = users(service.rec, 1)[0]
    assert client.post("/recommend", json={"user_id": user}).status_code == 200
    assert client.post("/recommend", json={"k": -1}).status_code == 400
    batch = {"requests": [{"user_id": user}, {"history": [], "k": 2}]}
    assert client.post("/recommend_batch", json=batch).status_code == 200
    after = samples(client)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert grew("recsys_http_requests_total", endpoint="/recommend") == 2
    assert grew("recsys_http_requests_total", endpoint="/recommend_batch") == 1
    assert grew("recsys_http_errors_total", endpoint="/recommend", kind="bad_request") == 1
    assert grew("recsys_http_request_seconds_count", endpoint="/recommend") == 2
    for stage in ("retrieval", "filtering", "scoring", "ordering", "total"):
        assert grew("recsys_stage_seconds_count", endpoint="/recommend", stage=stage) == 1
        assert grew("recsys_stage_seconds_count", endpoint="/recommend_batch", stage=stage) == 1
        assert grew("recsys_stage_seconds_bucket", endpoint="/recommend", stage=stage,
                    le="+Inf") == 1
    assert after[("recsys_artifacts_info", (("version", service.rec.version),))] == 1
    assert after[("recsys_ready", ())] == 1


def test_an_internal_failure_is_a_counted_500_not_a_dropped_connection(root):
    service = http.Service(root)
    service.rec = Recommender.load(root, warmup=False)
    for param in service.rec.artifacts.query_params.values():
        param.delete()  # a real fault: the query tower's parameters are gone
    with http.running(service, load=False) as url, httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(2):
            response = c.post("/recommend", json={"user_id": 1})
            assert response.status_code == 500 and response.json()["error"] == "internal"
        assert c.get("/healthz").status_code == 200
        assert samples(c)[("recsys_http_errors_total",
                           (("endpoint", "/recommend"), ("kind", "internal")))] == 2


def test_cli_without_the_http_extra_says_how_to_install_it(monkeypatch, capsys):
    import recsys.serve
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "recsys.serve.http")
    monkeypatch.delattr(recsys.serve, "http")
    assert cli.main(["serve-http", "--artifacts", "x", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'recsys[http]'" in err and "fastapi" in err


def test_cli_refuses_bad_artifacts_and_options_in_one_line(root, tmp_path, capsys):
    def serve_http(*args):
        assert cli.main(["serve-http", "--port", "0", *args]) == 2
        return capsys.readouterr().err

    missing = str(tmp_path / "no-artifacts")
    err = serve_http("--artifacts", missing)  # refused before listening
    assert err.count("\n") == 1 and err.startswith("recsys serve-http: error:")
    assert "no-artifacts" in err
    assert "--watch" in serve_http("--artifacts", missing, "--watch", "0")
    # Found but corrupt: the server stops when the background load fails, naming the file.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root, corrupt, symlinks=True)
    (artifacts.published(corrupt) / artifacts.ITEM_VECTORS).write_bytes(b"garbage")
    last = serve_http("--artifacts", str(corrupt)).strip().splitlines()[-1]
    assert last.startswith("recsys serve-http: error:") and "item_vectors.npy" in last


def test_reload_under_load_fails_no_request_and_tags_each_with_its_version(server, root):
    service, client = server
    first = service.rec.version
    assert client.post("/admin/reload").json() == {"version": first, "previous": first,
                                                   "reloaded": False}
    reqs = [{"user_id": u, "k": 4 + i % 7} for i, u in enumerate(users(service.rec, 16))]
    old = answers(service.rec, reqs)
    seen, failures, stop = [], [], threading.Event()

    def send(worker: int):
        deadline = time.monotonic() + 240
        with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
            for n in range(1500):  # bounded in count and time
                if stop.is_set() or time.monotonic() > deadline:
                    return
                i = (worker * 5 + n) % len(reqs)
                sent = time.monotonic()
                try:
                    response = c.post("/recommend", json=reqs[i])
                    body = response.json()
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {body}")
                        continue
                    seen.append((sent, body["version"], i, (body["items"], body["scores"])))
                except Exception:  # noqa: BLE001 - every failure is the test's finding
                    failures.append(traceback.format_exc())

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(seen) >= 40)
        second = republish(root, exclude_seen=False).name
        reloaded = client.post("/admin/reload")
        done = time.monotonic()
        assert reloaded.json() == {"version": second, "previous": first, "reloaded": True}
        wait_until(lambda: sum(s[0] > done for s in seen) >= 80)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    new = answers(service.rec, reqs)
    assert failures == [] and new != old
    assert {version for _, version, *_ in seen} == {first, second}
    for sent, version, i, got in seen:
        assert got == (old if version == first else new)[i]  # wholly the version it names
        assert sent < done or version == second  # sent after the reload: the new version
    assert client.post("/recommend", json=reqs[0]).json()["version"] == second
    assert client.get("/healthz").json()["version"] == second
    metrics = samples(client)
    assert metrics[("recsys_artifacts_info", (("version", second),))] == 1
    assert metrics[("recsys_reloads_total", (("outcome", "reloaded"),))] == 1


def wait_until(condition, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
