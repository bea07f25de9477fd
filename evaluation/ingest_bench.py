"""The queue's own throughput: photos pushed (XADD) and read to a published verdict, with 1, 2 and 4 shards on
one redis-server and on a 3-master Redis Cluster, photos inline against by reference, as ratios within one run.

Detection is stubbed out by a trivial model (every photo gets the same clean verdict, nothing decoded), so what
is measured is Redis and the worker's stream code: ``PRODUCERS`` processes ``push_requests`` pre-encoded
requests; then ``CONSUMERS`` consumer processes, split evenly over the shards (so that the shard count is what
changes), read batches (``XREADGROUP``) and publish a verdict per entry with the worker's publishing script
(verdict ``XADD``, idempotency check and ``XACK`` in one script). Bytes through Redis per photo are its
``total_net_input_bytes`` + ``total_net_output_bytes`` over the run. A last row times what a reference costs the
worker instead: fetching the photos (``worker.refs.RefFetcher``) and decoding them (the rows decode nothing).

``explainer bench --ingest`` (reports/scaling; about 7 minutes on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from redis.cluster import RedisCluster

from evaluation.datasets import load_imagenet_sample
from worker import wire
from worker.feed import push_requests
from worker.local_cluster import LocalCluster
from worker.local_redis import LocalRedis, free_port
from worker.refs import RefFetcher
from worker.streams import StreamConsumer, StreamNames, connect, is_cluster

SHARDS = (1, 2, 4)
PHOTOS_PER_ROW = 10_000
PRODUCERS = 2
CONSUMERS = 4  # consumer processes in all, split evenly over the shards: the shard count is what changes
BATCH = 64
NAMES = StreamNames.with_prefix("ingest")


def photo_files(n: int) -> list[bytes]:
    """The JPEG files of the shared ImageNet sample (about 110 KB each), repeated to ``n``."""
    files = [path for path, _label in load_imagenet_sample()]
    return [files[i % len(files)].read_bytes() for i in range(n)]


def requests(photos: list[bytes], by_ref: bool, base_url: str, part: int, parts: int) -> list[tuple[str, bytes]]:
    """(shard key, request bytes) of this producer's share; 100 cameras spread over the shards."""
    out = []
    for i in range(part, len(photos), parts):
        rid, source = f"p-{i}", f"cam-{i % 100}"
        if by_ref:
            raw = photos[i]
            ref = wire.Ref(f"{base_url}/{i % len(photos)}.jpg", len(raw), hashlib.sha256(raw).hexdigest())
            data = wire.encode_ref_request(rid, ref, encoding="jpeg", model="mobilenet_v2", source=source)
        else:
            data = msgpack_inline(rid, photos[i], source)
        out.append((source, data))
    return out


def msgpack_inline(rid: str, jpeg: bytes, source: str) -> bytes:
    """An inline request carrying the JPEG file as it is (what a camera sends), like ``encode_request`` would."""
    import msgpack

    return msgpack.packb({"v": wire.VERSION, "id": rid, "image": jpeg, "encoding": "jpeg", "model": "mobilenet_v2",
                          "source": source, "meta": {"enqueued_at": time.time()}}, use_bin_type=True)


def produce(url, shards, n, by_ref, base_url, part, parts, ready, go, done):
    photos = photo_files(n)
    reqs = requests(photos, by_ref, base_url, part, parts)
    client = connect(url)
    ready.wait()
    go.wait()
    push_requests(client, NAMES, reqs, shards=shards, pipeline_size=BATCH)
    done.put(len(reqs))


def consume(url, shards, index, consumer, ready, go, done):
    """One consumer of shard ``index``: read batches and publish a fixed verdict for each entry until the shard
    has nothing left to deliver (everything was pushed before the consumers started)."""
    client = connect(url)
    names = NAMES.shards(shards, is_cluster(client))[index]
    reader = StreamConsumer(client, names, consumer=f"c{consumer}", batch=BATCH, probe_k=0)
    ready.wait()
    go.wait()
    handled = 0
    while entries := reader.read(block_ms=0):
        reader.publish([(sid, {"id": sid, "is_adversarial": False, "score": 0.0}) for sid, _raw in entries])
        handled += len(entries)
    done.put(handled)


def net_bytes(client) -> int:
    """Bytes into and out of Redis so far, over every master of a cluster."""
    if is_cluster(client):
        infos = list(client.info("stats", target_nodes=RedisCluster.PRIMARIES).values())
    else:
        infos = [client.info("stats")]
    return sum(int(i["total_net_input_bytes"]) + int(i["total_net_output_bytes"]) for i in infos)


def run_processes(ctx, target, args_list) -> float:
    """Start one process per args, wait until all are ready, release them together; seconds until all finish."""
    ready, go = ctx.Barrier(len(args_list) + 1), ctx.Barrier(len(args_list) + 1)
    done = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, ready, go, done)) for args in args_list]
    for p in procs:
        p.start()
    ready.wait()
    t0 = time.perf_counter()
    go.wait()
    for _ in procs:
        done.get(timeout=900)
    seconds = time.perf_counter() - t0
    for p in procs:
        p.join()
    return seconds


def measure(ctx, url: str, shards: int, n: int, by_ref: bool, base_url: str) -> dict:
    client = connect(url)
    streams = NAMES.shards(shards, is_cluster(client))
    for names in streams:
        client.delete(names.images, names.verdicts)
        StreamConsumer(client, names).ensure_group()
    before = net_bytes(client)
    push_s = run_processes(ctx, produce, [(url, shards, n, by_ref, base_url, p, PRODUCERS) for p in range(PRODUCERS)])
    pushed = net_bytes(client)
    lengths = [int(client.xlen(names.images)) for names in streams]
    assert sum(lengths) == n, lengths
    per_shard = max(1, CONSUMERS // shards)
    read_s = run_processes(ctx, consume, [(url, shards, i, i * per_shard + c) for i in range(shards)
                                          for c in range(per_shard)])
    after = net_bytes(client)
    verdicts = sum(int(client.xlen(names.verdicts)) for names in streams)
    assert verdicts == n, verdicts
    for names in streams:
        client.delete(names.images, names.verdicts)
    client.close()
    return {"shards": shards, "payload": "ref" if by_ref else "inline", "photos": n,
            "push_per_s": n / push_s, "read_to_verdict_per_s": n / read_s,
            "bytes_in_push_per_photo": (pushed - before) / n, "bytes_per_photo": (after - before) / n,
            "per_shard": lengths}


# a static file server with keep-alive and a deep accept queue (``python -m http.server`` closes every connection
# and queues 5, so that 8 fetches at once meet SYN retries of a second)
FILE_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[2])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), backlog=1024, print=None, access_log=None)
"""


class PhotoServer:
    """The photos over loopback HTTP as ``/<i>.jpg``, from a process of its own (aiohttp's static files), so that
    serving them does not share the fetcher's interpreter: what a reference names."""

    def __init__(self, photos: list[bytes], folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(photos):
            (folder / f"{i}.jpg").write_bytes(data)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-c", FILE_SERVER, str(port), str(folder)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/0.jpg", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def fetch_cost(photos: list[bytes], server: PhotoServer) -> dict:
    """Photos/s the worker fetches by reference (``fetch_many`` in read batches, after one warm-up batch), over
    loopback HTTP and from a local folder (``file://``), against decoding the same photos, which inline and fetched
    photos alike pay."""
    from pipeline import decode_image

    out: dict = {"photos": len(photos)}
    for kind, base in (("http", server.url), ("file", server.folder.resolve().as_uri())):
        fetcher = RefFetcher([base])
        refs = [(f"{base}/{i}.jpg", len(p), hashlib.sha256(p).hexdigest()) for i, p in enumerate(photos)]
        fetcher.fetch_many(refs[:BATCH])
        t0 = time.perf_counter()
        got = []
        for k in range(0, len(refs), BATCH):
            got += fetcher.fetch_many(refs[k:k + BATCH])
        out[f"fetch_{kind}_per_s"] = len(photos) / (time.perf_counter() - t0)
        assert all(isinstance(g, bytes) for g in got), [g for g in got if not isinstance(g, bytes)][:1]
        fetcher.close()
    t0 = time.perf_counter()
    for p in photos:
        decode_image(p)
    out["decode_per_s"] = len(photos) / (time.perf_counter() - t0)
    return out


def photo_stage_costs(n: int = 16) -> dict:
    """Milliseconds per photo of each stage of the shipped photo detector (MobileNetV2 with its calibration) on
    ``n`` ImageNet-sample photos, on this host's CPU: what the stages behind the queue cost per photo, for sizing
    (docs/scaling.md). Empty when the shared weights are missing."""
    import torch

    from evaluation.throughput import stage_times
    from pipeline import Detector, read_image_file
    from pipeline.models.imagenet import SHARED_WEIGHTS

    weights = SHARED_WEIGHTS["mobilenet_v2"]
    calibration = Path(__file__).resolve().parents[1] / "reports" / "imagenet" / "calibration.json"
    if not weights.exists() or not calibration.exists():
        return {}
    det = Detector.from_pretrained("mobilenet_v2", weights=weights, calibration=calibration)
    photos = [read_image_file(path) for path, _label in load_imagenet_sample()[:n]]
    return {"photos": n, "torch_threads": torch.get_num_threads(), **stage_times(det, photos, repeat=2)}


def run_ingest_bench(out: Path, photos: int = PHOTOS_PER_ROW, shards: tuple[int, ...] = SHARDS, log=print) -> dict:
    """Every row (one redis-server, then a 3-master cluster; each shard count; inline, then by reference), the
    fetch-and-decode cost, written to ``out``/ingest.json and report.md."""
    ctx = mp.get_context("spawn")
    files = photo_files(photos)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = PhotoServer(files, Path(tmp) / "photos")
        try:
            with LocalRedis(Path(tmp) / "one") as one:
                for n in shards:
                    for by_ref in (False, True):
                        rows.append({"redis": "one redis-server", **measure(ctx, one.url, n, photos, by_ref,
                                                                             server.url)})
                        log(json.dumps(rows[-1]))
            # the same server without its append-only file: how much of the inline rate is the disk's
            with LocalRedis(Path(tmp) / "bare", extra_config={"appendonly": "no"}) as bare:
                for by_ref in (False, True):
                    rows.append({"redis": "one redis-server, AOF off", **measure(ctx, bare.url, 1, photos, by_ref,
                                                                                  server.url)})
                    log(json.dumps(rows[-1]))
            with LocalCluster(masters=3, data_dir=Path(tmp) / "cluster", appendfsync="everysec") as cluster:
                for n in shards:
                    for by_ref in (False, True):
                        rows.append({"redis": "3-master cluster", **measure(ctx, cluster.url, n, photos, by_ref,
                                                                             server.url)})
                        log(json.dumps(rows[-1]))
            cost = fetch_cost(files[:512], server)
            log(json.dumps(cost))
            stages = photo_stage_costs()
            log(json.dumps(stages))
        finally:
            server.close()
    write_report(out, rows, cost, stages, photos)
    return {"rows": rows, "fetch_and_decode": cost, "photo_stages_ms": stages}


def write_report(out: Path, rows: list[dict], cost: dict, stages: dict, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps({"rows": rows, "fetch_and_decode": cost, "photo_stages_ms": stages},
                                                indent=1) + "\n")
    base = {r["payload"]: r for r in rows if r["redis"] == "one redis-server" and r["shards"] == 1}
    lines = [
        "# Ingest: shards, Redis Cluster, photos inline or by reference",
        "",
        f"`explainer bench --ingest --n {n} --out {out}`: {n:,} ImageNet-sample JPEG photos (mean "
        f"{base['inline']['bytes_in_push_per_photo'] / 1024:.0f} KiB through Redis per push) per row, {PRODUCERS} "
        f"producer processes, then {CONSUMERS} consumer processes split over the shards (batches of {BATCH}); "
        "detection stubbed out (a fixed verdict per photo, nothing decoded), so the figures are the queue's. "
        "Ratios are against one shard on one redis-server with the same payload, measured in the same run. All "
        "processes share this host's 2 cores. Every server but the one marked keeps an append-only file "
        "(`appendfsync everysec`, as shipped): each byte pushed is also written to this host's disk.",
        "",
        "| Redis | shards | payload | push photos/s | × | read → verdict photos/s | × | bytes through Redis / photo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base[r["payload"]]
        lines.append(f"| {r['redis']} | {r['shards']} | {r['payload']} | {r['push_per_s']:,.0f} | "
                     f"{r['push_per_s'] / b['push_per_s']:.2f} | {r['read_to_verdict_per_s']:,.0f} | "
                     f"{r['read_to_verdict_per_s'] / b['read_to_verdict_per_s']:.2f} | "
                     f"{r['bytes_per_photo']:,.0f} |")
    lines += ["", f"What a reference costs the worker instead (one process, {cost['photos']} photos, "
              f"`RefFetcher.fetch_many` in batches of {BATCH}): over loopback HTTP (aiohttp's static files, another "
              "process) "
              f"**{cost['fetch_http_per_s']:,.0f} photos/s**, from a local folder (`file://`) "
              f"**{cost['fetch_file_per_s']:,.0f} photos/s**; decoding the JPEGs, which inline and fetched photos "
              f"alike pay: {cost['decode_per_s']:,.0f} photos/s on one thread.", ""]
    if stages:
        lines += [f"Behind the queue, per photo, the shipped photo detector (MobileNetV2, {stages['photos']} "
                  f"ImageNet-sample photos, {stages['torch_threads']} threads, `evaluation.throughput.stage_times`): "
                  + ", ".join(f"{k} **{v:.1f} ms**" for k, v in stages.items()
                              if k not in ("photos", "torch_threads")) + ".", ""]
    (out / "report.md").write_text("\n".join(lines))
