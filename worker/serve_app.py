"""The Ray Serve application: CPU ``Denoiser`` → GPU-able ``Explainer`` (``@serve.batch``) → CPU ``Scorer``,
composed with deployment handles behind an ``Ingress`` that consumes the Redis image stream and serves HTTP.
The Ingress calls the Denoiser and the Explainer; the Explainer hands each request's explanation to the Scorer
itself, so the largest array of a batch, its maps, goes from the Explainer to the Scorer directly instead of
through the Ingress, and only the small verdicts come back.

Each stage runs the detection core's own stage functions (``Detector.denoise``, ``explain_pair``, ``decide``),
so the verdicts equal the in-process ``Detector.detect`` on the same images. Batches travel as numpy arrays of
uint8 pixels (``Detector.prepare(as_pixels=True)``), a quarter of the float batch's bytes: inline between the
processes of the embedded stack (``worker.embedded``), through Ray's object store on a cluster. The Explainer
merges concurrent batches (up to ``max_batch_size`` images) into one Captum call.

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type, and Serve the real
:class:`AppArgs`. Serve pickles a deployment's class when it is declared, with the module globals its methods
use as they are then: whatever they call must be defined above them.)
"""


import asyncio
import dataclasses
import hmac
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from pydantic import ConfigDict, Field, create_model, field_validator, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline import (
    RULES,
    DetectionResult,
    Detector,
    Explained,
    ImageTooLargeError,
    InputError,
    MemoryCeiling,
    decode_image,
    denoise_prepared,
    images_per_call,
)
from worker import wire
from worker.calls import AbandonableThreads
from worker.detect import detect_requests, load_served_deciders, load_served_detectors
from worker.refs import REF_TIMEOUT_S, RefFetcher
from worker.streams import (
    PASSWORD_ENV,
    StreamConsumer,
    StreamEvents,
    StreamNames,
    StreamSettings,
    StreamWorker,
    connect_with_password,
    is_cluster,
    note_shards,
    total_backlog,
)

log = logging.getLogger("explainer.serve")
HTTP_TOKEN_ENV = "EXPLAINER_HTTP_TOKEN"
MAX_HTTP_BODY = 8 * 1024 * 1024
EXPLAIN_MAX_BATCH = 256  # images per merged Captum call unless the Explainer's user_config says otherwise
# merged calls one Explainer replica runs at once, each on a thread of its own: while one batch is in the
# Python-bound parts of a call (autograd set-up, copies, the result's serialisation) the other one computes, so
# the model's cores stay busy (docs/method.md, "Streaming and performance")
EXPLAIN_CONCURRENT_BATCHES = 2
# a stage call that has not answered after this long is abandoned (its batch stays pending and is retried), and
# a consumer whose detection has run for STALL_FACTOR times that fails the replica's health check
STAGE_TIMEOUT_S = 300.0
STALL_FACTOR = 2
# an Explainer replica with this many abandoned calls still stuck fails its health check and is replaced: a model
# that hangs once costs one thread, one that hangs again and again costs a replica
MAX_ABANDONED_CALLS = 4 * EXPLAIN_CONCURRENT_BATCHES
WARM_UP_PIXELS = 2**18  # height × width of input per explain thread in a replica's warm-up: 256 digits, 5 photos


def stream_client(redis_url: str, password_file: str | None, **kwargs):
    """A Redis client for the stream at ``redis_url``, authenticated with :func:`worker.streams.redis_password`."""
    return connect_with_password(redis_url, password_file, **kwargs)


MIN_TOKEN_CHARS = 16


def http_token(token_file: str | None) -> str | None:
    """The bearer token the HTTP route requires: ``token_file``'s content (surrounding whitespace dropped) when
    given, else ``EXPLAINER_HTTP_TOKEN``, else None (no authentication: the HTTP proxy must listen on loopback
    only, :func:`check_http_exposure`). A token that is empty, blank, shorter than ``MIN_TOKEN_CHARS`` or holds
    whitespace is an error, never "no token": authentication is never off by accident."""
    if token_file:
        token, where = Path(token_file).read_text().strip(), str(token_file)
    elif HTTP_TOKEN_ENV in os.environ:
        token, where = os.environ[HTTP_TOKEN_ENV].strip(), f"${HTTP_TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{where}: the HTTP bearer token must be at least {MIN_TOKEN_CHARS} printable characters "
                         "without whitespace (an empty or blank one does not turn authentication off; unset it "
                         "to serve loopback only)")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http_exposure(host: str | None, token: str | None) -> None:
    """Refuse to answer HTTP on ``host`` without a token unless it is loopback (None: where Serve's proxy
    listens could not be read, which counts as exposed)."""
    if token is None and (host is None or not is_loopback(host)):
        where = f"on {host}" if host else "on an address that could not be read from Serve"
        raise ValueError(f"the HTTP proxy listens {where}, beyond this machine, and POST /detect has no bearer "
                         f"token: give one (http_token_file, or ${HTTP_TOKEN_ENV} in the replicas' environment; "
                         "explainer serve --http-token-file) and put TLS in front, or listen on 127.0.0.1")


def serve_proxy_host() -> str | None:
    """The address Serve's HTTP proxies listen on (the config's ``http_options.host``), read from the running
    Serve controller; None when it cannot be read."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - any failure means we cannot tell, which check_http_exposure refuses
        return None




class StageStats:
    """Per-replica counters of a stage's own work (calls, images, wall and thread-CPU seconds inside it), so a
    profile can tell a stage that is busy from one that waits: ``stats()`` on any stage's handle. ``cpu_s`` is
    the calling thread's CPU only: torch's and OpenCV's worker threads are not in it (a process's whole CPU is
    in /proc, which ``explainer bench`` reads). Calls that overlap (the Explainer's concurrent
    batches) each add their own wall time, so ``busy_s`` can exceed the wall time of a burst."""

    def _init_stats(self) -> None:
        self._stats = {"calls": 0, "images": 0, "busy_s": 0.0, "cpu_s": 0.0}
        self._stats_lock = threading.Lock()

    @contextmanager
    def _timed(self, images: int):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            with self._stats_lock:
                self._stats["calls"] += 1
                self._stats["images"] += images
                self._stats["busy_s"] += time.perf_counter() - wall
                self._stats["cpu_s"] += time.thread_time() - cpu

    async def stats(self) -> dict:
        with self._stats_lock:
            return {"pid": os.getpid(), **self._stats}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class Denoiser(StageStats):
    """OpenCV non-local means over a whole prepared batch (CPU; OpenCV's threads release the GIL)."""

    def __init__(self, detectors: list[dict], nlm_threads: int | None = None) -> None:
        # each detector's NLM parameters: all this stage uses (no network is loaded here)
        self.nlm = {name: d.config.nlm for name, d in load_served_deciders(detectors).items()}
        self.nlm_threads = nlm_threads
        self._init_stats()

    async def __call__(self, x: np.ndarray, model: str) -> np.ndarray:
        with self._timed(len(x)):
            return denoise_prepared(x, self.nlm[model], workers=self.nlm_threads)


def _weight(x: np.ndarray, max_batch_size: int) -> int:
    """What one image of the batch ``x`` (N, C, H, W) counts for in a merged call of ``max_batch_size``: 1 for a
    digit, and for a photo ``max_batch_size // pipeline.images_per_call``, so that a call holds
    ``max_batch_size`` digits or at most ``images_per_call`` photos (16 ImageNet photos)."""
    return max(1, max_batch_size // images_per_call(*x.shape[1:]))


def _call_cost(weighed: list[tuple[np.ndarray, int]]) -> int:
    """``@serve.batch`` size of a merged call (Serve passes each request's first arg, (images, weight)): its
    images by weight."""
    return sum(len(x) * weight for x, weight in weighed)


@serve.deployment(ray_actor_options={"num_cpus": 1, "num_gpus": 0}, max_ongoing_requests=16)
class Explainer(StageStats):
    """Predictions + Captum maps for originals and denoised copies. Concurrent requests are merged by
    ``@serve.batch`` into one Captum call of up to ``max_batch_size`` images (counted in images, not calls),
    and up to ``EXPLAIN_CONCURRENT_BATCHES`` such calls run at once, each on a thread."""

    def __init__(
        self, scorer: DeploymentHandle | None, detectors: list[dict], torch_threads: int | None = None,
        redis_url: str | None = None, redis_password_file: str | None = None, streams: dict | None = None,
        stage_timeout_s: float = STAGE_TIMEOUT_S, shards: int = 1,
    ) -> None:
        import torch

        self.scorer = scorer
        # a merged call that has not returned after this long is abandoned: its requests fail (their consumers
        # retry them one by one), and a new thread takes its place (worker.calls)
        self.stage_timeout_s = stage_timeout_s
        # the stream this stage's replicas serve: its backlog drives their autoscaling (worker.autoscale)
        self._backlog = None
        self._probing = False
        if redis_url:
            # a client that fails fast: Serve gives up on the call after a few seconds anyway
            client = stream_client(redis_url, redis_password_file, retries=0, socket_timeout=2.0)
            self._backlog = [StreamConsumer(client, names, consumer="autoscaling", block_ms=0)
                             for names in StreamNames(**(streams or {})).shards(shards, is_cluster(client))]
            self._last_backlog = 0.0

        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        device = "cuda" if torch.cuda.is_available() else None
        self.detectors = load_served_detectors(detectors, device)
        self.max_batch_size = EXPLAIN_MAX_BATCH
        # the merged calls' own threads, the same ones for the replica's life unless a call hangs (asyncio.to_thread
        # would rotate through the loop's default pool, each new thread setting up its own OpenMP team)
        self._pool = AbandonableThreads(EXPLAIN_CONCURRENT_BATCHES, name="explain")
        self._init_stats()
        self._warm_up()
        # the heap a long stream fragments is trimmed back near its warm-up size (pipeline.runtime)
        self._memory = MemoryCeiling()
        self._memory.start()

    def _warm_up(self) -> None:
        """A batch of zeros on each explain thread before the replica takes requests, so that the first real
        batches do not pay for what a thread sets up once (its OpenMP team, oneDNN's kernels, the allocator's
        growth); at most ``WARM_UP_PIXELS`` of input per thread and model, so a photo model's warm-up is a few
        images."""
        for detector in self.detectors.values():
            m = detector.model
            n = max(1, min(self.max_batch_size, WARM_UP_PIXELS // (m.size * m.size)))
            x = np.zeros((n, m.channels, m.size, m.size), np.uint8)  # pixels, as the Ingress sends them
            every_thread = threading.Barrier(EXPLAIN_CONCURRENT_BATCHES)  # so that no thread takes two batches

            def one(detector=detector, x=x, every_thread=every_thread) -> None:
                every_thread.wait(timeout=60)
                detector.explain_pair(x, x)

            for f in [self._pool.submit(one) for _ in range(EXPLAIN_CONCURRENT_BATCHES)]:
                f.result()

    async def explain_and_score(self, x: np.ndarray, denoised: np.ndarray, model: str, rule: str | None = None,
                                return_maps: bool = False, fpr: float | None = None) -> DetectionResult:
        """One request explained (merged with others, :meth:`explain`) and then scored by the Scorer: the maps
        travel from here to the Scorer and only the verdicts go back to the caller. The request's slot here is
        held while the Scorer works, about a tenth of the explanation's time on digits."""
        if self.scorer is None:
            raise RuntimeError("this Explainer was built without a Scorer handle (build_app binds one)")
        return await self.scorer.remote(await self.explain_any(x, denoised, model), model, rule, return_maps, fpr)

    async def explain_any(self, x: np.ndarray, denoised: np.ndarray, model: str) -> Explained:
        """One request of any size. Serve's batcher refuses a single request above ``max_batch_size`` (a
        RuntimeError on every call, so a stream read larger than it would be retried until dead-lettered), so a
        larger one is split into pieces (of that many digits, or the photos that weigh as much: :func:`_weight`)
        that :meth:`explain` merges with other requests like any other."""
        weight = _weight(x, self.max_batch_size)
        step = max(1, self.max_batch_size // weight)
        if len(x) <= step:
            return await self.explain((x, weight), denoised, model)
        pieces = [self.explain((x[i : i + step], weight), denoised[i : i + step], model)
                  for i in range(0, len(x), step)]
        return Explained.concat(list(await asyncio.gather(*pieces)))

    def _explain_merged(self, originals: list[np.ndarray], denoised: list[np.ndarray], models: list[str]
                        ) -> list[Explained]:
        """One Captum call per model over the merged requests, on a worker thread (``explain_pair`` is
        thread-safe); one :class:`Explained` per request, in order."""
        with self._timed(sum(len(x) for x in originals)):
            self._memory.check()
            out: list[Explained | None] = [None] * len(originals)
            for model in dict.fromkeys(models):
                rows = [i for i, m in enumerate(models) if m == model]
                merged = self.detectors[model].explain_pair(np.concatenate([originals[i] for i in rows]),
                                                            np.concatenate([denoised[i] for i in rows]))
                bounds = np.cumsum([0, *(len(originals[i]) for i in rows)])
                for i, a, b in zip(rows, bounds[:-1], bounds[1:], strict=True):
                    out[i] = merged.part(a, b)
            return out

    def check_health(self) -> None:
        """Serve's periodic health check: ``MAX_ABANDONED_CALLS`` merged calls abandoned and still stuck (a model
        that keeps hanging) fail it, so Serve replaces this replica and its stuck threads with it. Fewer cost only
        their threads: the replica serves on with fresh ones."""
        stuck = self._pool.abandoned
        if stuck >= MAX_ABANDONED_CALLS:
            raise RuntimeError(f"{stuck} explanation calls abandoned and still running: the model hangs")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics Serve collects from each replica (worker.autoscale.backlog_policy reads
        them): the images waiting in the stream or in flight, and how many images one replica takes at once."""
        capacity = float(self.max_batch_size * EXPLAIN_CONCURRENT_BATCHES)
        if self._backlog is None:
            return {"replica_capacity": capacity}
        if not self._probing:  # one probe at a time: a slow Redis must not pile up threads
            self._probing = True
            try:
                pending, waiting = await asyncio.to_thread(total_backlog, self._backlog)
                self._last_backlog = float(pending + waiting)
            finally:
                self._probing = False
        return {"stream_backlog": self._last_backlog, "replica_capacity": capacity}

    def reconfigure(self, config: dict) -> None:
        """``user_config``: max_batch_size (images) and batch_wait_timeout_s of the merged Captum call."""
        if "max_batch_size" in config:
            self.max_batch_size = int(config["max_batch_size"])
            self.explain.set_max_batch_size(self.max_batch_size)
        if "batch_wait_timeout_s" in config:
            self.explain.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=EXPLAIN_MAX_BATCH, batch_wait_timeout_s=0.0, batch_size_fn=_call_cost,
                 max_concurrent_batches=EXPLAIN_CONCURRENT_BATCHES)
    async def explain(self, weighed: list[tuple[np.ndarray, int]], denoised: list[np.ndarray], models: list[str]
                      ) -> list[Explained]:
        """Requests merged by Serve, whichever detector each names: one Captum call per model among them."""
        return await self._run_merged([x for x, _ in weighed], denoised, models)

    async def _run_merged(self, originals: list[np.ndarray], denoised: list[np.ndarray], models: list[str]
                          ) -> list[Explained]:
        """:meth:`_explain_merged` on one of the replica's threads. A call that has not returned after
        ``stage_timeout_s`` is abandoned (:class:`worker.calls.AbandonableThreads`) and every request in it fails
        with ``TimeoutError``: the consumers retry their images one at a time, so an image that hangs the model is
        isolated and its batch-mates get their verdicts."""
        call = self._pool.submit(self._explain_merged, originals, denoised, models)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(call), self.stage_timeout_s)
        except TimeoutError:
            self._pool.abandon(call)
            log.error("an explanation call of %d images did not return in %.0f s: abandoned (%d stuck)",
                      sum(len(x) for x in originals), self.stage_timeout_s, self._pool.abandoned)
            raise TimeoutError(f"the model did not return within {self.stage_timeout_s:.0f} s") from None


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
class Scorer(StageStats):
    """Entropy of every map, the calibrated score and the decision (CPU)."""

    def __init__(self, detectors: list[dict]) -> None:
        self.deciders = load_served_deciders(detectors)  # config and calibration: no network is loaded here
        self._init_stats()

    async def __call__(self, explained: Explained, model: str, rule: str | None = None, return_maps: bool = False,
                       fpr: float | None = None):
        """``fpr``: decide at that operating point of the calibration (None: the deployment's, AppArgs.fpr)."""
        with self._timed(len(explained.probs) // 2):
            return self.deciders[model].decide(explained, rule, return_maps, fpr)


@dataclass
class RemoteDetector:
    """What :func:`worker.detect.detect_requests` needs of a detector, backed by the deployments (the Explainer
    calls the Scorer).

    ``detect`` blocks on the handles, so it runs on the consumer threads, never on the replica's event loop.
    """

    local: Detector
    denoiser: DeploymentHandle
    explainer: DeploymentHandle
    timeout_s: float = STAGE_TIMEOUT_S

    @property
    def name(self) -> str:
        return self.local.model.name

    @property
    def config(self):
        return self.local.config

    def check(self, image: np.ndarray) -> None:
        self.local.check(image)

    @property
    def model(self):
        return self.local.model

    def _chain(self, images: object, rule: str | None, return_maps: bool, fpr: float | None = None):
        """Denoiser → Explainer (→ Scorer) as chained responses: the denoised batch is passed to the Explainer by
        reference and resolved there, so it is never deserialised here (Ray still relays an inline one through
        this process, its owner); the maps go from the Explainer to the Scorer, and only the verdicts come back."""
        # validation here: a bad image fails before it costs a stage call; uint8 pixels travel, not floats
        x = self.local.prepare(images, as_pixels=True)
        denoised = self.denoiser.remote(x, self.name)
        return self.explainer.explain_and_score.remote(x, denoised, self.name, rule, return_maps, fpr)

    def detect(self, images: object, rule: str | None = None, return_maps: bool = False) -> DetectionResult:
        """Blocks a consumer thread at most ``timeout_s``: a hung stage raises ``TimeoutError`` and the batch
        stays pending, to be retried."""
        return self._chain(images, rule, return_maps).result(timeout_s=self.timeout_s)

    async def detect_async(self, images: object, rule: str | None = None, return_maps: bool = False,
                           fpr: float | None = None):
        return await self._chain(images, rule, return_maps, fpr)


LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000]
BACKLOG_POLL_S = 5.0


class ServeMetrics(StreamEvents):
    """The stream's Prometheus metrics, through ``ray.serve.metrics`` (Ray exports them, prefixed ``ray_``, on
    each node's metrics endpoint): verdicts by model and outcome, alerts, dead letters by kind, publish failures,
    references that could not be fetched, enqueue → verdict latency, and the stream's pending and waiting entries
    (deploy/grafana-dashboard.json)."""

    def __init__(self, model: str) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.model = model
        self.verdicts = Counter("explainer_verdicts", description="verdicts written, by model and outcome",
                                tag_keys=("model", "outcome"))
        self.alerts = Counter("explainer_alerts", description="adversarial verdicts published as alerts",
                              tag_keys=("model",))
        self.dead = Counter("explainer_dead_letters", description="entries moved to the dead-letter stream",
                            tag_keys=("kind",))
        self.failures = Counter("explainer_publish_failures", description="verdict batches that failed to land",
                                tag_keys=("error",))
        self.unfetched = Counter("explainer_ref_fetch_failures", description="images sent by reference that "
                                 "could not be fetched now (left pending, retried)")
        self.latency = Histogram("explainer_latency_ms", description="enqueue to verdict, milliseconds",
                                 boundaries=LATENCY_BUCKETS_MS, tag_keys=("model",))
        self.pending = Gauge("explainer_stream_pending", description="entries delivered but not yet acked")
        self.waiting = Gauge("explainer_stream_waiting", description="entries not yet delivered to the group")

    def published(self, verdicts, written) -> None:
        for verdict, new in zip(verdicts, written, strict=True):
            if not new:
                continue
            model = str(verdict.get("model") or self.model)
            outcome = ("error" if verdict.get("error") else
                       "adversarial" if verdict.get("is_adversarial") else "clean")
            self.verdicts.inc(tags={"model": model, "outcome": outcome})
            if outcome == "adversarial":
                self.alerts.inc(tags={"model": model})
            if isinstance(verdict.get("latency_ms"), (int, float)):
                self.latency.observe(float(verdict["latency_ms"]), tags={"model": model})

    def dead_lettered(self, kind: str) -> None:
        self.dead.inc(tags={"kind": kind})

    def publish_failed(self, error: str) -> None:
        self.failures.inc(tags={"error": error})

    def fetch_failed(self, count: int) -> None:
        self.unfetched.inc(count)

    def backlog(self, pending: int, waiting: int) -> None:
        self.pending.set(pending)
        self.waiting.set(waiting)


def decode_body(body: bytes) -> np.ndarray:
    """An HTTP body as uint8 H×W or H×W×3 (RGB), decoded as files are (``pipeline.decode_image``): what it
    costs is read and bounded first (at most ``pipeline.MAX_DECODE_BYTES`` of memory, ``MAX_JPEG_SCANS``
    passes), a photo of any size up to 4096² pixels, 16-bit PNGs decoded straight to 8 bits, bytes after the
    image's end allowed (a phone's motion-photo trailer)."""
    return decode_image(body, "request body")


# no /docs, /redoc or /openapi.json: they would answer without the token (docs/wire.md documents the routes)
http = FastAPI(title="explainer", description="Adversarial-image detection (EXPLAINER)", docs_url=None,
               redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64, graceful_shutdown_timeout_s=60)
@serve.ingress(http)
class Ingress:
    """Consumes each shard of the Redis image stream with ``consumers`` threads (one consumer-group member each,
    so batches overlap across stages) and answers HTTP: ``POST /detect`` (a PNG/JPEG body) and ``GET /healthz``."""

    def __init__(
        self, denoiser: DeploymentHandle, explainer: DeploymentHandle, detectors: list[dict],
        redis_url: str | None = None, redis_password_file: str | None = None, streams: dict | None = None,
        consumers: int = 2, stream_settings: dict | None = None,
        max_body_bytes: int = MAX_HTTP_BODY, stage_timeout_s: float = STAGE_TIMEOUT_S,
        http_token_file: str | None = None, ref_allow: list[str] | None = None, ref_timeout_s: float = REF_TIMEOUT_S,
    ) -> None:
        self.http_token = http_token(http_token_file)
        check_http_exposure(serve_proxy_host(), self.http_token)
        self.remotes = {name: RemoteDetector(det, denoiser, explainer, stage_timeout_s)
                        for name, det in load_served_detectors(detectors).items()}
        self.stall_s = STALL_FACTOR * stage_timeout_s
        self.default_model = next(iter(self.remotes))  # what POST /detect uses when no ?model= is given
        self.max_body_bytes = max_body_bytes
        self.stop = threading.Event()
        self.workers: list[StreamWorker] = []
        self.threads: list[threading.Thread] = []
        self.metrics = ServeMetrics(self.default_model)
        if redis_url:
            settings, base = StreamSettings(**(stream_settings or {})), StreamNames(**(streams or {}))
            client = stream_client(redis_url, redis_password_file)  # the shard count's note and the backlog probe
            note_shards(client, base, settings.shards)
            shards = base.shards(settings.shards, is_cluster(client))
            tag = f"{socket.gethostname()}-{os.getpid()}"
            fetcher = RefFetcher(ref_allow or (), timeout_s=ref_timeout_s)
            for s, names in enumerate(shards):  # every replica reads every shard, so a shard is never orphaned
                turns = threading.Lock()  # one consumer of a shard at a time waits on it (StreamConsumer.read)
                for i in range(consumers):
                    consumer = StreamConsumer(stream_client(redis_url, redis_password_file), names,
                                              consumer=f"{tag}-{i}", settings=settings, events=self.metrics,
                                              read_lock=turns)
                    consumer.ensure_group()
                    worker = StreamWorker(consumer, lambda reqs: detect_requests(self.remotes, reqs),
                                          models=set(self.remotes), fetcher=fetcher,
                                          call_batch=lambda model: self.remotes[model].local.call_batch)
                    name = f"consumer-{i}" if len(shards) == 1 else f"consumer-{s}-{i}"
                    thread = threading.Thread(target=worker.run, args=(self.stop,), name=name, daemon=True)
                    self.workers.append(worker)
                    self.threads.append(thread)
                    thread.start()
            watches = [StreamConsumer(client, names, consumer=f"{tag}-watch") for names in shards]
            threading.Thread(target=self._watch_backlog, args=(watches,), name="backlog", daemon=True).start()

    def _watch_backlog(self, consumers: list[StreamConsumer]) -> None:
        """Every ``BACKLOG_POLL_S``: the pending and waiting entries of every shard into the metrics."""
        while not self.stop.wait(BACKLOG_POLL_S):
            try:
                self.metrics.backlog(*total_backlog(consumers))
            except Exception as exc:  # noqa: BLE001 - a metric must never take the replica down
                log.warning("could not read the stream's backlog: %s", exc)

    def _drain(self, timeout_s: float = 50.0) -> int:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=timeout_s)
        return sum(t.is_alive() for t in self.threads)

    async def drain(self) -> int:
        """Stop reading the stream and finish (publish and ack) the batches in flight, while the downstream
        stages are still up; returns how many consumer threads are still running (0 when drained).
        ``embedded_stack`` calls this before deleting the application."""
        return await asyncio.to_thread(self._drain)

    def __del__(self) -> None:
        """Last resort when the app is deleted without :meth:`drain`: stop reading."""
        self._drain(timeout_s=10.0)

    def _dead_consumers(self) -> list[str]:
        return [] if self.stop.is_set() else [t.name for t in self.threads if not t.is_alive()]

    def _stalled_consumers(self) -> list[str]:
        return [f"{t.name} ({w.busy_for():.0f} s in one batch)" for t, w in zip(self.threads, self.workers, strict=True)
                if w.busy_for() > self.stall_s]

    def _problems(self) -> list[str]:
        """What /healthz reports as degraded: dead or stalled consumers, verdicts Redis will not take."""
        out = [f"consumer thread died: {name}" for name in self._dead_consumers()]
        out += [f"consumer stalled: {what}" for what in self._stalled_consumers()]
        out += sorted({w.degraded for w in self.workers if w.degraded})
        return out

    def check_health(self) -> None:
        """Serve's periodic health check: a consumer thread that died (e.g. Redis refused the credentials) or
        one stuck in a batch far longer than a stage call may take fails it, so Serve replaces this replica
        instead of leaving the stream unread behind a healthy face. (A full Redis does not: a new replica
        would not help; /healthz and the publish-failure metric say so.)"""
        dead, stalled = self._dead_consumers(), self._stalled_consumers()
        if dead or stalled:
            raise RuntimeError(f"stream consumers: died {dead}, stalled {stalled}")

    def _authorized(self, request: Request) -> bool:
        """Whether the request carries the bearer token (always, when no token is configured)."""
        if self.http_token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.http_token}".encode())

    @http.get("/healthz")
    async def healthz(self, request: Request) -> dict:
        """Liveness for anyone (``status`` alone); the problems, models and consumer counters only with the
        token, when one is configured."""
        problems = self._problems()
        status = "degraded" if problems else "ok"
        if not self._authorized(request):
            return {"status": status}
        alive = sum(t.is_alive() for t in self.threads)
        stats = [w.consumer.stats for w in self.workers]
        return {"status": status, "problems": problems, "models": list(self.remotes),
                "consumers_alive": alive, "consumers": stats}

    @http.post("/detect")
    async def detect(self, request: Request, heatmap: bool = False, rule: str | None = None,
                     model: str | None = None, fpr: float | None = None) -> dict:
        if not self._authorized(request):
            raise HTTPException(401, "a bearer token is required (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})
        remote = self.remotes.get(model or self.default_model)
        if remote is None:
            raise HTTPException(404, f"unknown model {model!r}; this deployment serves {sorted(self.remotes)}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {self.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise HTTPException(413, f"body exceeds the limit of {self.max_body_bytes} bytes")
        if rule is not None and rule not in RULES:
            raise HTTPException(422, f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
        if fpr is not None:
            try:
                remote.local.calibration.point(fpr)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from exc
        try:  # off the event loop the consumers share
            image = await asyncio.to_thread(decode_body, bytes(body))
        except InputError as exc:
            raise HTTPException(413 if isinstance(exc, ImageTooLargeError) else 415, str(exc)) from exc
        try:
            res = await remote.detect_async(image, rule, heatmap, fpr)
        except InputError as exc:
            raise HTTPException(422, str(exc)) from exc
        row = res.rows()[0]
        out = {"v": wire.VERSION, "model": remote.name, "method": remote.config.method, **row}
        if heatmap and res.maps is not None:
            out["heatmap"] = {"shape": list(res.maps[0].shape), "values": np.round(res.maps[0], 6).tolist()}
        return out


# the stream's knobs as Serve args, one field per StreamSettings knob (its name, default and help; checked there)
StreamArgs = create_model("StreamArgs", **{name: (int, Field(default, description=help))
                                           for name, (default, help) in StreamSettings.knobs().items()})


class AppArgs(StreamArgs):
    """The application's ``args``, as ``serve run``, ``serve deploy`` and KubeRay pass them to :func:`build_app`
    from the YAML. An unknown or misspelt key is an error that names it. The Redis password never goes here:
    the replicas read it from the environment variable ``EXPLAINER_REDIS_PASSWORD`` or from
    ``redis_password_file``."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # a bad value may hold a secret

    detector: str | list[str] | None = Field(
        None, description="detector bundles (paths every replica can read, each optionally pinned as "
        "PATH@sha256:HEX) or built-in model names, served side by side: a request's `model` field picks one by its "
        "name. None: the built-in `model`")
    trust_code: bool = Field(False, description="load bundles whose network is code (a Python callable they name, "
                             "a torch.export program, a TorchScript module): only bundles from a trusted source")
    model: str = Field("mnist", description="built-in model name (pipeline.MODEL_NAMES), when no `detector`")
    weights: str | None = Field(None, description="the built-in model's weights file (the photo models)")
    calibration: str | None = Field(None, description="the built-in model's calibration file (default: shipped)")
    fpr: float | None = Field(None, gt=0, lt=1, description="the operating point every served detector decides at, "
                              "as its calibration's target false-positive rate, e.g. 0.01 (None: each calibration's "
                              "default); POST /detect?fpr= picks another per request")
    redis_url: str | None = Field("redis://127.0.0.1:6379/0", description="the stream's Redis; None: HTTP only")
    redis_password_file: str | None = Field(None, description="a file holding the Redis password")
    streams: dict[str, str] | None = Field(None, description="stream and group names (worker.streams.StreamNames)")
    consumers: int = Field(2, ge=1, description="consumer-group members per Ingress replica and shard")
    ref_allow: list[str] = Field([], description="where images sent by reference (`ref`) may be fetched from: URL "
                                 "prefixes naming scheme and host, e.g. https://photos.example.com/cams/ or "
                                 "file:///srv/photos/ (worker.refs); empty: none")
    ref_timeout_s: float = Field(REF_TIMEOUT_S, gt=0, description="fetching one referenced image gives up after this")
    max_body_bytes: int = Field(MAX_HTTP_BODY, ge=1, description="largest POST /detect body")
    stage_timeout_s: float = Field(STAGE_TIMEOUT_S, gt=0, description="a stage call abandoned after this long")
    http_token_file: str | None = Field(None, description="a file holding the bearer token POST /detect requires "
                                        f"(default: ${HTTP_TOKEN_ENV}; neither: no authentication)")
    torch_threads: int | None = Field(None, ge=1, description="Explainer intra-op threads")
    nlm_threads: int | None = Field(None, ge=1, description="Denoiser OpenCV threads")

    @model_validator(mode="after")
    def _one_way_to_name_detectors(self) -> "AppArgs":
        if self.detector is not None and self.model_fields_set & {"model", "weights", "calibration"}:
            raise ValueError("give either detector (bundles or built-in names) or model/weights/calibration")
        if self.detector is not None and not self.detector:
            raise ValueError("detector: give at least one bundle or built-in model name")
        return self

    @model_validator(mode="after")
    def _stream_settings_hold(self) -> "AppArgs":
        self.stream_settings()
        return self

    @model_validator(mode="after")
    def _ref_allow_holds(self) -> "AppArgs":
        RefFetcher(self.ref_allow, timeout_s=self.ref_timeout_s)  # a bad prefix fails here, not in every replica
        return self

    def stream_settings(self) -> StreamSettings:
        """The stream's knobs as the one settings type (validated there)."""
        return StreamSettings(**{name: getattr(self, name) for name in StreamSettings.knobs()})

    def detector_refs(self) -> list[dict]:
        """What each stage loads its detectors from (:func:`worker.detect.detector_ref`), or the built-in
        ``model`` with its ``weights`` and ``calibration``."""
        from worker.detect import detector_ref

        if self.detector is None:
            point = {} if self.fpr is None else {"fpr": self.fpr}  # None: each calibration's own default
            return [{"model": self.model, "weights": self.weights, "calibration": self.calibration, **point}]
        given = [self.detector] if isinstance(self.detector, str) else self.detector
        return [detector_ref(ref, self.trust_code, self.fpr) for ref in given]

    @field_validator("redis_url")
    @classmethod
    def _no_password_in_url(cls, url: str | None) -> str | None:
        if url and (urlsplit(url).password or "password" in parse_qs(urlsplit(url).query)):
            raise ValueError("redis_url carries a password: the password never goes in the config; set "
                             f"{PASSWORD_ENV} in the replicas' environment or give redis_password_file")
        return url


def build_app(args: AppArgs) -> serve.Application:
    """Serve application builder: ``import_path: worker.serve_app:build_app`` with ``args`` (:class:`AppArgs`) in
    the YAML. Per-deployment options (replicas, autoscaling, resources) come from the config's ``deployments``
    list, which Serve applies by deployment name."""
    if isinstance(args, dict):  # a direct call from Python; Serve validates the YAML's args itself
        args = AppArgs.model_validate(args)
    common = {"detectors": args.detector_refs()}
    stream = {k: getattr(args, k) for k in ("redis_url", "redis_password_file", "streams")}
    ingress = {k: getattr(args, k) for k in ("consumers", "max_body_bytes", "stage_timeout_s", "http_token_file",
                                             "ref_allow", "ref_timeout_s")}
    ingress["stream_settings"] = dataclasses.asdict(args.stream_settings())
    return Ingress.bind(
        Denoiser.bind(**common, nlm_threads=args.nlm_threads),
        Explainer.bind(Scorer.bind(**common), **common, **stream, torch_threads=args.torch_threads,
                       stage_timeout_s=args.stage_timeout_s, shards=args.shards),
        **common, **stream, **ingress,
    )
