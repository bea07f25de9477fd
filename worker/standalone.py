"""One worker process without Ray: consume the image stream with the in-process detector and publish verdicts.

``python -m worker.standalone --redis-url redis://:PASSWORD@host:6379/0`` (``rediss://`` for TLS; redis-py reads
``?ssl_ca_certs=/path/ca.pem`` and similar from the URL). The smallest deployable unit, and the process the fault
tests kill, restart and signal (``tests/faults``): several of them may share one consumer group.

SIGTERM / SIGINT stop reading; the batch in flight is finished, published and acked, and the process exits 0.
It prints one JSON line when ready and one with its counters when stopped (stdout); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading

import redis

from worker.local_redis import resolve_redis_url
from worker.refs import REF_TIMEOUT_S, RefFetcher
from worker.streams import (
    StreamConsumer,
    StreamNames,
    StreamSettings,
    StreamWorker,
    connect_with_password,
    is_cluster,
    note_shards,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the Redis URL may come from ``EXPLAINER_REDIS_URL`` (keeps a password off argv)."""
    ap = argparse.ArgumentParser(prog="python -m worker.standalone", description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default=None, help="default: $EXPLAINER_REDIS_URL, else the server `explainer "
                    "serve` started from this folder, else redis://127.0.0.1:6379/0")
    ap.add_argument("--redis-password-file", default=None, help="a file holding the Redis password (default: "
                    "$EXPLAINER_REDIS_PASSWORD); keeps it off argv and out of the URL")
    ap.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}", help="consumer-group member")
    ap.add_argument("--prefix", default=None, help="all stream names under this prefix (default explainer:*)")
    ap.add_argument("--all-verdicts-channel", default=None, help="also PUBLISH every verdict on this channel")
    ap.add_argument("--detector", action="append", default=None, metavar="BUNDLE",
                    help="a detector bundle (PATH, or PATH@sha256:HEX to serve only that one) or built-in model "
                    "name to serve (repeatable: a request's model field picks one by name; default: the shipped "
                    "mnist detector)")
    ap.add_argument("--model", default=None, help="a built-in model to serve (same as --detector NAME)")
    ap.add_argument("--trust-code", action="store_true", help="load bundles whose network is code (a Python "
                    "callable they name, a torch.export program, TorchScript): only from a trusted source")
    ap.add_argument("--fpr", type=float, default=None, help="the operating point to decide at, as a target "
                    "false-positive rate the calibrations hold, e.g. 0.01 (default: each calibration's own)")
    for name, (default, help) in StreamSettings.knobs().items():  # --batch, --block-ms, ... (one place: there)
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=help)
    ap.add_argument("--ref-allow", action="append", default=[], metavar="URL_PREFIX",
                    help="where images sent by reference may be fetched from, e.g. https://photos.example.com/cams/ "
                    "(repeatable; default: nowhere)")
    ap.add_argument("--ref-timeout-s", type=float, default=REF_TIMEOUT_S, help="fetching one referenced image gives "
                    "up after this long")
    ap.add_argument("--trim-interval-s", type=float, default=5.0, help="trim acked image entries this often")
    ap.add_argument("--torch-threads", type=int, default=None)
    return ap.parse_args(argv)


def build_workers(args: argparse.Namespace) -> list[StreamWorker]:
    """The detectors asked for (default: the shipped mnist one) behind one consumer-group member per shard,
    trimming acked image entries as they go."""
    from pipeline import keep_allocations_mapped
    from worker.detect import detect_requests, detector_ref, load_served_detectors

    keep_allocations_mapped()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    names = StreamNames.with_prefix(args.prefix) if args.prefix else StreamNames()
    names.all_verdicts_channel = args.all_verdicts_channel
    given = (args.detector or []) + ([args.model] if args.model else [])
    detectors = load_served_detectors([detector_ref(ref, args.trust_code, args.fpr) for ref in given or ["mnist"]])
    try:
        settings = StreamSettings(**{name: getattr(args, name) for name in StreamSettings.knobs()})
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    url = resolve_redis_url(args.redis_url)
    fetcher = RefFetcher(args.ref_allow, timeout_s=args.ref_timeout_s)
    client = connect_with_password(url, args.redis_password_file)
    note_shards(client, names, settings.shards)
    workers = []
    for shard in names.shards(settings.shards, is_cluster(client)):
        consumer = StreamConsumer(connect_with_password(url, args.redis_password_file), shard, consumer=args.consumer,
                                  settings=settings)
        workers.append(StreamWorker(consumer, lambda reqs: detect_requests(detectors, reqs),
                                    trim_interval_s=args.trim_interval_s, models=detectors, fetcher=fetcher,
                                    call_batch=lambda model: detectors[model].call_batch))
    return workers


def run_all(workers: list[StreamWorker], stop: threading.Event) -> None:
    """Each shard's worker on a thread of its own until ``stop``; a worker that raises (refused credentials) stops
    them all, and its error is raised here."""
    errors: list[BaseException] = []

    def run(worker: StreamWorker) -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=run, args=(w,), name=f"shard-{i}") for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(timeout=0.2)
    if errors:
        raise errors[0]


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then finish the batch in flight. Exit 0 when every computed verdict landed,
    1 when some could not be published (their entries stay pending), 2 when Redis refused the credentials or a
    detector could not be loaded."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        workers = build_workers(args)
    except (FileNotFoundError, ValueError, PermissionError) as e:
        print(json.dumps({"event": "error", "error": str(e)}), flush=True)
        return 2
    print(json.dumps({"event": "ready", "pid": os.getpid(), "consumer": args.consumer, "shards": len(workers)}),
          flush=True)
    try:
        run_all(workers, stop)
    except redis.AuthenticationError as e:
        print(json.dumps({"event": "error", "error": f"redis authentication failed: {e}"}), flush=True)
        return 2
    stats = {k: sum(w.consumer.stats[k] for w in workers) for k in workers[0].consumer.stats}
    unpublished = sum(w.unpublished for w in workers)
    print(json.dumps({"event": "stopped", "pid": os.getpid(), "consumer": args.consumer,
                      "stats": dict(stats, unpublished=unpublished)}), flush=True)
    return 0 if not unpublished else 1


if __name__ == "__main__":
    sys.exit(main())
