"""HTTP serving: one `Recommender` behind FastAPI + uvicorn, with health, Prometheus metrics and
hot reload (docs/serving.md, "HTTP"). Needs the http extra: pip install 'recsys[http]'."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

try:
    import fastapi
    import prometheus_client as prom
    import uvicorn
    from starlette.concurrency import run_in_threadpool
except ModuleNotFoundError as e:  # one line for the CLI, not a traceback
    raise ImportError(f"the HTTP server needs {e.name}, which is not installed: "
                      "pip install 'recsys[http]'", name=e.name) from None

from recsys import artifacts as bundle
from recsys.config import ConfigError
from recsys.serve.recommender import STAGES, Recommendation, Recommender
from recsys.serve.requests import RequestError

log = logging.getLogger("recsys.serve.http")

MAX_BODY_BYTES = 4 << 20  # a larger request body is refused (413) before it is parsed
SECONDS_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
JSON = "application/json"


class NotReady(Exception):
    """The artifacts are not loaded and warmed up (yet, or the load failed)."""


class TooLarge(Exception):
    """A request body above MAX_BODY_BYTES."""


class Metrics:
    """The Prometheus series of one server, in a registry of its own."""

    def __init__(self):
        r = self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("recsys_http_requests", "HTTP requests by endpoint",
                                     ["endpoint"], registry=r)
        self.errors = prom.Counter(
            "recsys_http_errors", "failed HTTP requests by endpoint and kind (bad_request, "
            "too_large, not_ready, internal, reload_failed)", ["endpoint", "kind"], registry=r)
        self.latency = prom.Histogram("recsys_http_request_seconds",
                                      "wall seconds from request to response, by endpoint",
                                      ["endpoint"], buckets=SECONDS_BUCKETS, registry=r)
        self.stages = prom.Histogram(
            "recsys_stage_seconds", "seconds per serving stage of each Recommender call (a "
            "batch is one call), by endpoint", ["endpoint", "stage"], buckets=SECONDS_BUCKETS,
            registry=r)
        self.version = prom.Info("recsys_artifacts", "the artifacts version served", registry=r)
        self.reloads = prom.Counter("recsys_reloads", "reloads by outcome (reloaded, unchanged, "
                                    "failed)", ["outcome"], registry=r)
        self.ready = prom.Gauge("recsys_ready", "1 once the artifacts are loaded and warmed up",
                                registry=r)

    def observe_call(self, endpoint: str, out: list[Recommendation]) -> None:
        if out:  # every result of one call carries the same (whole-call) timings
            for stage in (*STAGES, "total"):
                self.stages.labels(endpoint, stage).observe(out[0].timings[stage] / 1e3)


class Service:
    """The one Recommender a server runs: loaded (and warmed up) off the event loop, reloaded in
    place, and optionally following the artifacts root's `current` pointer."""

    def __init__(self, artifacts, *, watch: float | None = None, **overrides):
        """artifacts: a root or version directory; watch: seconds between polls of `current`
        (None: reload only on POST /admin/reload); overrides: ServeConfig fields."""
        if watch is not None and not watch > 0:
            raise ConfigError(f"--watch {watch}: must be a number of seconds > 0")
        self.artifacts = artifacts
        self.watch_seconds = watch
        self.overrides = overrides
        self.metrics = Metrics()
        self.rec: Recommender | None = None
        self.error: BaseException | None = None  # why the first load failed
        self.on_failure: Callable[[], None] = lambda: None  # e.g. stop the server
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def load(self) -> None:
        """Loads and warms up in the caller's thread; /healthz answers 200 from then on."""
        try:
            rec = Recommender.load(self.artifacts, **self.overrides)
        except BaseException as e:
            self.error = e
            raise
        self.rec = rec
        self.metrics.ready.set(1)
        log.info("serving artifacts version %s", rec.version)

    def reload(self) -> dict:
        """The published version, loaded and swapped in (see `Recommender.reload`)."""
        rec = self.ready()
        previous = rec.version
        try:
            version = rec.reload()
        except Exception:
            self.metrics.reloads.labels("failed").inc()
            raise
        changed = version != previous
        self.metrics.reloads.labels("reloaded" if changed else "unchanged").inc()
        if changed:
            log.info("reloaded: artifacts version %s (was %s)", version, previous)
        return {"version": version, "previous": previous, "reloaded": changed}

    def recommend(self, body) -> dict:
        """POST /recommend: one request's fields -> one result (JSON-ready)."""
        if not isinstance(body, dict):
            raise RequestError("body", "expected a JSON object of request fields, got "
                               f"{_json_type(body)}")
        out = self.ready().recommend_batch([body])
        self.metrics.observe_call("/recommend", out)
        return _result(out[0])

    def recommend_batch(self, body) -> dict:
        """POST /recommend_batch: {"requests": [fields, ...]} -> {"results": [...]}."""
        if not isinstance(body, dict):
            raise RequestError("body", f'expected {{"requests": [...]}}, got {_json_type(body)}')
        for key in body:
            if key != "requests":
                raise RequestError(str(key), 'unknown field; expected {"requests": [...]}')
        if "requests" not in body:
            raise RequestError("requests", 'missing; expected {"requests": [...]}')
        out = self.ready().recommend_batch(body["requests"])
        self.metrics.observe_call("/recommend_batch", out)
        return {"results": [_result(r) for r in out]}

    def ready(self) -> Recommender:
        if self.rec is None:
            raise NotReady("failed" if self.error is not None else "loading")
        return self.rec

    def start(self) -> None:
        """Loads in a background thread, then polls `current` every `watch_seconds` (if set)."""
        self._spawn(self._load_then_watch)

    def stop(self) -> None:
        """Ends the watch; a load or reload under way is left to finish (daemon threads)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def _spawn(self, target) -> None:
        t = threading.Thread(target=target, name="recsys-http-service", daemon=True)
        self._threads.append(t)
        t.start()

    def _load_then_watch(self) -> None:
        if self.rec is None:
            try:
                self.load()
            except BaseException as e:  # noqa: BLE001 - reported by the caller of serve()
                log.error("cannot serve %s: %s", self.artifacts, e)
                self.on_failure()
                return
        while self.watch_seconds is not None and not self._stop.wait(self.watch_seconds):
            try:
                self.reload()
            except Exception as e:  # noqa: BLE001 - the old version keeps serving; retried
                log.error("reload failed, still serving %s: %s", self.rec.version, e)


def create_app(service: Service, load: bool = True) -> fastapi.FastAPI:
    """The HTTP API over `service`; with `load`, startup begins loading it in the background."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load:
            service.start()
        yield
        service.stop()

    app = fastapi.FastAPI(title="recsys", lifespan=lifespan)
    m = service.metrics

    @app.post("/recommend")
    async def post_recommend(request: fastapi.Request):
        return await _answer(service, "/recommend", request, service.recommend)

    @app.post("/recommend_batch")
    async def post_recommend_batch(request: fastapi.Request):
        return await _answer(service, "/recommend_batch", request, service.recommend_batch)

    @app.post("/admin/reload")
    async def post_reload(request: fastapi.Request):
        return await _answer(service, "/admin/reload", request, lambda body: service.reload())

    @app.get("/healthz")
    async def healthz():
        try:
            content, status = {"status": "ok", "version": service.ready().version}, 200
        except NotReady as e:
            content, status = {"status": str(e)}, 503
            if service.error is not None:
                content["error"] = str(service.error)
        return fastapi.Response(_dumps(content), status, media_type=JSON)

    @app.get("/metrics")
    async def metrics():
        if service.rec is not None:
            m.version.info({"version": service.rec.version})
        return fastapi.Response(prom.generate_latest(m.registry),
                                media_type=prom.CONTENT_TYPE_LATEST)

    return app


def serve(artifacts, host: str, port: int, *, watch: float | None = None) -> None:
    """Runs the server until interrupted (`recsys serve-http`); raises what the load raised."""
    service = Service(artifacts, watch=watch)
    with bundle.reading(artifacts):  # no root or no version: one line now, before listening
        pass
    sock = bind(host, port)
    logs = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # recsys.* lines beside uvicorn's own
    logs["loggers"]["recsys"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_config=logs))
    service.on_failure = lambda: setattr(server, "should_exit", True)
    log.info("listening on http://%s:%d (loading %s)", host, sock.getsockname()[1], artifacts)
    with sock:
        server.run(sockets=[sock])
    if service.error is not None:
        raise service.error


@contextlib.contextmanager
def running(service: Service, host: str = "127.0.0.1", port: int = 0,
            load: bool = True) -> Iterator[str]:
    """Serves `service` from a background thread until the block ends; yields the base URL
    (port 0: a free port). For tests, benchmarks and embedding."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(create_app(service, load), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {host}:{port} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; a bad or busy address is one ConfigError line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except (OSError, OverflowError) as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there "
                          f"({getattr(e, 'strerror', None) or e})") from None


async def _answer(service: Service, endpoint: str, request: fastapi.Request,
                  work: Callable[[object], dict]) -> fastapi.Response:
    """`work(JSON body)` run in the threadpool, as a JSON response; every failure is an HTTP
    status (never a dropped connection), counted by kind."""
    m = service.metrics
    t0 = time.perf_counter()
    m.requests.labels(endpoint).inc()
    try:
        service.ready()  # 503 before anything else while loading
        body = await _body(request)
        status, content = 200, await run_in_threadpool(lambda: _dumps(work(body)))
    except Exception as e:  # noqa: BLE001 - each kind has its answer
        kind, status, error = _error(endpoint, e)
        m.errors.labels(endpoint, kind).inc()
        content = _dumps({"error": kind, **error})
    m.latency.labels(endpoint).observe(time.perf_counter() - t0)
    return fastapi.Response(content, status, media_type=JSON)


async def _body(request: fastapi.Request):
    """The request body as JSON (an empty body is {}); RequestError("body") when it is not."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise TooLarge(f"body: above {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an int of > 4300 digits
        raise RequestError("body", f"not JSON ({e})") from None


def _error(endpoint: str, e: Exception) -> tuple[str, int, dict]:
    """(kind, HTTP status, JSON fields) of a failed request."""
    if isinstance(e, RequestError):
        return "bad_request", 400, {"field": e.field, "message": str(e)}
    if isinstance(e, TooLarge):
        return "too_large", 413, {"field": "body", "message": str(e)}
    if isinstance(e, NotReady):
        return "not_ready", 503, {"message": f"artifacts not served yet ({e})"}
    if endpoint == "/admin/reload":  # e.g. an ArtifactError: the old version keeps serving
        log.error("reload failed: %s", e)
        return "reload_failed", 500, {"message": str(e)}
    log.exception("internal error on %s", endpoint)
    return "internal", 500, {"message": f"internal error ({type(e).__name__}); see the log"}


def _result(r: Recommendation) -> dict:
    return {"items": r.items, "scores": r.scores, "titles": r.titles, "timings": r.timings,
            "unknown_ids": r.unknown_ids, "cold_start": r.cold_start, "version": r.version}


def _dumps(content) -> bytes:
    return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def _json_type(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")
