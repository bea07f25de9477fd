"""``explainer bench``: the floor, in-process throughput, stages, batch sizes, the wire, Redis, and the
streaming path (throughput, latency at a steady load below saturation, 1 vs 2 replicas of the CPU stages), all
in one run on one machine, written to metrics.json and a Markdown report with a plot."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from evaluation.proc_cpu import cpu_by_label, cpu_seconds
from evaluation.throughput import best_of, detector_throughput, floor_throughput, signal_times, stage_times
from pipeline import Detector, keep_allocations_mapped, load_adversarial_digits, load_sample_digits
from worker import wire
from worker.collect import collect_verdicts, last_id
from worker.embedded import embedded_stack, load_config
from worker.feed import push_images
from worker.local_redis import LocalRedis, free_port
from worker.streams import StreamConsumer, StreamNames, connect


def mnist_images(n: int) -> np.ndarray:
    clean = load_sample_digits().parity("odd").images
    adv = load_adversarial_digits().images
    both = np.concatenate([clean, adv])
    return both[np.random.default_rng(0).permutation(len(both))[:n]]


def wire_and_redis(images: np.ndarray, data_dir: Path) -> dict:
    """ms per image to encode+decode a request, and for Redis I/O (XADD, XREADGROUP, XADD verdict + XACK)."""
    payloads = [wire.encode_request(f"b{i}", im) for i, im in enumerate(images)]
    decode_ms = 1000 * best_of(lambda: [wire.decode_request(p) for p in payloads]) / len(images)
    encode_ms = 1000 * best_of(lambda: [wire.encode_request("x", im) for im in images]) / len(images)
    with LocalRedis(data_dir / "bench-redis") as r:
        client = connect(r.url)
        names = StreamNames.with_prefix(f"bench{time.time_ns()}")
        consumer = StreamConsumer(client, names, batch=len(images), block_ms=100)
        consumer.ensure_group()
        t = time.perf_counter()
        push_images(client, names, images)
        entries = consumer.read()
        consumer.publish([(sid, {"v": 1, "id": str(i), "is_adversarial": False}) for i, (sid, _) in
                          enumerate(entries)])
        redis_ms = 1000 * (time.perf_counter() - t) / len(images)
    return {"wire_encode_ms": encode_ms, "wire_decode_ms": decode_ms, "redis_io_ms": redis_ms}


def steady_load(client, names: StreamNames, images: np.ndarray, rate: float, tag: str,
                seconds: float = 10.0, min_images: int = 100) -> dict:
    """Latency at a fixed offered load: ``rate`` images/s for ``seconds`` (at least ``min_images``; ``images``
    repeated as needed), pushed in
    small bursts every 50 ms (one image at a time below 20/s). Percentiles of enqueue → verdict and of its
    hops: waiting in the stream (``queued_ms``), the detection (read → verdict ready) and the write (verdict
    ready → Redis's XADD time, from the verdict entry's id)."""
    n = max(min_images, int(rate * seconds))
    images, ids = images[np.arange(n) % len(images)], [f"{tag}-{i}" for i in range(n)]
    chunk = max(1, int(rate * 0.05))
    after = last_id(client, names.verdicts)
    start = time.perf_counter()
    for k in range(0, n, chunk):
        time.sleep(max(0.0, start + k / rate - time.perf_counter()))
        push_images(client, names, images[k : k + chunk], ids=ids[k : k + chunk])
    got = list(collect_verdicts(client, names, ids, after, timeout_s=300).values())
    hops = {
        "total": [v["latency_ms"] for v in got],
        "queued": [v["queued_ms"] for v in got],
        "detect": [v["latency_ms"] - v["queued_ms"] for v in got],
        "write": [max(0.0, 1000 * (v["written_at"] - v["done_at"])) for v in got],
    }
    out = {"rate": rate, "sent": n, "received": len(got)}
    for hop, values in hops.items():
        prefix = "" if hop == "total" else f"{hop}_"
        out[f"{prefix}p50_ms"] = float(np.percentile(values, 50)) if values else float("nan")
        out[f"{prefix}p99_ms"] = float(np.percentile(values, 99)) if values else float("nan")
    return out


LOAD_FRACTIONS = (0.01, 0.05, 0.3, 0.6)  # of the burst rate: where latency is reported


def streaming(images: np.ndarray, data_dir: Path, replicas: int, steady_fraction: float = 0.6,
              burst_factor: int = 16, app_overrides: dict | None = None,
              load_fractions: tuple[float, ...] = LOAD_FRACTIONS,
              deployment_overrides: dict[str, dict] | None = None,
              in_process: Callable[[], float] = lambda: float("nan"), rounds: int = 3) -> dict:
    """Burst throughput, then latency at ``steady_fraction`` of it, through Redis and the Serve application
    configured by deploy/serve.yaml. Each burst repeats ``images`` ``burst_factor`` times, so that filling and
    draining the stage pipeline is a small share of the burst's time.

    ``rounds`` bursts are timed, and ``in_process`` (images/s of the in-process detector) is called before
    each and after the last, while the stack sits idle: a shared machine's speed drifts within a minute, so
    each burst is compared with the mean of the in-process runs just before and after it, and the median of
    those ratios is reported. ``app_overrides`` replaces application args of deploy/serve.yaml
    (e.g. torch_threads) and ``deployment_overrides`` deployment options (e.g. the Explainer's replicas), for
    experiments."""
    cpu_stage = {"num_replicas": replicas, "autoscaling_config": None}
    deployments = {"Denoiser": cpu_stage, "Scorer": cpu_stage, **(deployment_overrides or {})}
    with embedded_stack(data_dir=data_dir / f"stream{replicas}", http_port=free_port(), overrides=app_overrides,
                        deployment_overrides=deployments) as st:
        client, names = connect(st.redis_url), StreamNames()
        warm = [f"warm{i}" for i in range(256)]
        after = last_id(client, names.verdicts)
        push_images(client, names, images[:256], ids=warm)
        collect_verdicts(client, names, warm, after, timeout_s=120)
        burst = np.concatenate([images] * burst_factor)
        rates, received, latency, local, cpu = [], [], [], [], []
        for r in range(rounds):
            local.append(in_process())
            after = last_id(client, names.verdicts)
            ids = [f"burst{replicas}-{r}-{i}" for i in range(len(burst))]
            cpu_before = cpu_seconds()
            t = time.perf_counter()
            push_images(client, names, burst, ids=ids)
            got = collect_verdicts(client, names, ids, after, timeout_s=600)
            rates.append(len(got) / (time.perf_counter() - t))
            cpu.append({k: 1000 * v / max(len(got), 1) for k, v in
                        cpu_by_label(cpu_before, cpu_seconds(), own="bench (producer + collector)").items()})
            received.append(len(got))
            latency += [v["latency_ms"] for v in got.values()]
        local.append(in_process())
        saturation = float(np.median(rates))
        loads = {f: steady_load(client, names, images, f * saturation, f"steady{replicas}-{f}")
                 for f in sorted({*load_fractions, steady_fraction})}
        steady = loads[steady_fraction]
        pending = int(client.xpending(names.images, names.group)["pending"])
    out = {
        "replicas_cpu_stages": replicas, "burst_images": len(burst), "bursts": rates,
        "burst_received": min(received),
        "throughput": float(np.median(rates)), "burst_p50_ms": float(np.percentile(latency, 50)),
        "burst_p99_ms": float(np.percentile(latency, 99)), "steady_rate": steady["rate"],
        "steady_received": steady["received"], "steady_sent": steady["sent"],
        "steady_p50_ms": steady["p50_ms"], "steady_p99_ms": steady["p99_ms"], "pending_after": pending,
        "latency_by_load": {str(f): v for f, v in loads.items()},
    }
    out["in_process_between"] = local
    # CPU ms per image by part of the stack, the median over the bursts (read from /proc around each burst), and the
    # median of each burst's total; "other" (processes that are not the stack's, Redis's or Ray's) is not counted
    parts = {k for c in cpu for k in c}
    out["cpu_ms_per_image"] = dict(sorted(((k, float(np.median([c.get(k, 0.0) for c in cpu]))) for k in parts),
                                          key=lambda kv: -kv[1]))
    out["cpu_ms_per_image_total"] = float(np.median([sum(v for k, v in c.items() if k != "other") for c in cpu]))
    # each burst against the mean of the in-process runs just before and after it, median over bursts
    per_burst = [rate / ((local[i] + local[i + 1]) / 2) for i, rate in enumerate(rates)]
    out["ratio_to_in_process"] = float(np.median(per_burst))
    out["ratio_rounds"] = per_burst
    return out


PHOTO_BURST = 40  # photos per burst through the stream: web photos of many sizes, sent as JPEG
PHOTO_RATE = 1.0  # photos per second of the light-load run
PHOTO_SECONDS = 60.0


def photo_streaming(data_dir: Path, model: str = "mobilenet_v2", rounds: int = 3, log=print) -> dict:
    """Photos through the stream beside the same detector in-process, in one run: bursts of ``PHOTO_BURST`` JPEG
    web photos (the NIPS 2017 set) against the in-process rate at its best call size (timed between the bursts at
    ``pipeline.images_per_call`` photos per call, and at 1), then ``PHOTO_RATE`` photos a second for
    ``PHOTO_SECONDS``: enqueue → verdict against one photo's in-process time."""
    import cv2

    from evaluation.datasets import SHARED_DATA
    from pipeline import read_image_file

    paths = sorted((SHARED_DATA / "nips17" / "images").iterdir())[: 2 * PHOTO_BURST]
    # as a camera sends them: JPEG files, decoded by the worker; in-process gets the same decoded pixels
    photos = [cv2.imdecode(cv2.imencode(".jpg", read_image_file(p)[:, :, ::-1])[1], cv2.IMREAD_COLOR)[:, :, ::-1]
              for p in paths]
    det = Detector.from_pretrained(model)
    per_call = det.call_batch

    def in_process(batch: int, n: int) -> float:  # seconds per photo
        t = time.perf_counter()
        for i in range(0, n, batch):
            det.detect(photos[i : i + batch])
        return (time.perf_counter() - t) / n

    in_process(per_call, per_call)  # warm
    out: dict = {"model": model, "burst": PHOTO_BURST, "images_per_call": per_call, "bursts_s_per_photo": [],
                 "in_process_s_per_photo": [], "in_process_single_s": []}
    with embedded_stack(data_dir=data_dir / "photo-stream", http_port=free_port(),
                        overrides={"detector": [model]}) as st:
        client, names = connect(st.redis_url), StreamNames()
        warm = [f"pw{i}" for i in range(per_call)]
        after = last_id(client, names.verdicts)
        push_images(client, names, photos[:per_call], ids=warm, model=model, encoding="jpeg")
        collect_verdicts(client, names, warm, after, timeout_s=300)
        for r in range(rounds):
            out["in_process_s_per_photo"].append(in_process(per_call, PHOTO_BURST))
            out["in_process_single_s"].append(in_process(1, 4))
            ids = [f"pb{r}-{i}" for i in range(PHOTO_BURST)]
            after = last_id(client, names.verdicts)
            t = time.perf_counter()
            push_images(client, names, photos[r % 2 * PHOTO_BURST :][:PHOTO_BURST], ids=ids, model=model,
                        encoding="jpeg")
            got = collect_verdicts(client, names, ids, after, timeout_s=600)
            out["bursts_s_per_photo"].append((time.perf_counter() - t) / max(len(got), 1))
            log(f"  photo burst {r}: {out['bursts_s_per_photo'][-1]:.3f} s/photo through the stream, "
                f"{out['in_process_s_per_photo'][-1]:.3f} in-process")
        n = int(PHOTO_RATE * PHOTO_SECONDS)
        ids = [f"pl-{i}" for i in range(n)]
        after = last_id(client, names.verdicts)
        start = time.perf_counter()
        for k in range(n):
            time.sleep(max(0.0, start + k / PHOTO_RATE - time.perf_counter()))
            push_images(client, names, [photos[k % len(photos)]], ids=[ids[k]], model=model, encoding="jpeg")
        got = collect_verdicts(client, names, ids, after, timeout_s=300)
        lat = [v["latency_ms"] for v in got.values()]
    out["in_process_single_s"].append(in_process(1, 4))
    # the in-process peer at its best call size (the medians at images_per_call photos and at one)
    best = min(float(np.median(out["in_process_s_per_photo"])), float(np.median(out["in_process_single_s"])))
    out.update({"stream_s_per_photo": float(np.median(out["bursts_s_per_photo"])), "in_process_best_s": best,
                "ratio_to_in_process": best / float(np.median(out["bursts_s_per_photo"])),
                "light_rate": PHOTO_RATE, "light_sent": n, "light_received": len(got),
                "light_p50_ms": float(np.percentile(lat, 50)), "light_p99_ms": float(np.percentile(lat, 99)),
                "single_ms": 1000 * float(np.median(out["in_process_single_s"])),
                "in_process_call_s_per_photo": float(np.median(out["in_process_s_per_photo"]))})
    return out


def imagenet_timing(name: str, weights: str | None, random_init: bool, n: int = 4, device: str | None = None,
                    batch: int | None = None, photos_dir: str | Path | None = None) -> dict:
    """Seconds per detection of an ImageNet-size model on ``n`` real 224×224 photos in batches of ``batch``
    (default: all n at once) on ``device`` (default: the CPU), beside its floor at the same batch. ``photos_dir``:
    a folder laid out as ``imagenet-sample/`` (labels.csv + images/), default the shared sample."""
    from evaluation.datasets import load_imagenet_sample
    from pipeline import preset
    from pipeline.inputs import read_image_file
    from pipeline.models import load_model

    model = load_model(name, weights, random_init=random_init)
    if device:
        model.to(device)
    det = Detector(model, preset("photos"))
    rows = load_imagenet_sample(photos_dir)
    photos = [read_image_file(p) for p, _ in rows[:n]]
    if not photos:
        raise ValueError(f"no photos to time in {photos_dir or 'the shared ImageNet sample'}")
    if det.config.uses("transplant_gain"):  # the transplant's hosts, which a calibration would pick: the last photos
        det.use_hosts([read_image_file(p) for p, _ in rows[-det.config.params("transplant_gain").hosts:]])
    batch = min(batch or n, len(photos))

    def run() -> None:
        for i in range(0, len(photos), batch):
            # the sign rule: an uncalibrated detector (random weights, timing only) decides nothing else; it costs
            # what the calibrated rule costs, every signal of the preset measured either way
            det.detect(photos[i : i + batch], rule="sign")  # returns numpy arrays: the device's work is done

    seconds = best_of(run, repeat=2) / len(photos)
    floor = floor_throughput(det, batch=batch, repeat=2)
    full = floor_throughput(det, batch=batch, repeat=2, with_checks=True)
    return {"model": name, "weights": "random (timing only)" if random_init else str(weights or "shared"),
            "device": device_name(model.device), "photos": len(photos), "batch": batch,
            "signals": list(det.config.signals),
            "seconds_per_detection": seconds, "detections_per_s": 1 / seconds,
            "floor_seconds_per_image": 1 / floor["images_per_s"],
            "ratio_to_floor": (1 / floor["images_per_s"]) / seconds, "passes_per_image": floor["passes_per_image"],
            "floor_with_checks_seconds_per_image": 1 / full["images_per_s"],
            "inference_passes_per_image": full["inference_passes_per_image"],
            "ratio_to_floor_with_checks": (1 / full["images_per_s"]) / seconds}


def device_name(device: torch.device | str) -> str:
    """What a timing ran on, for the record: the GPU's name, or the CPU's cores."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def run_photo_bench(out: Path, model: str, weights: str | None = None, device: str | None = None, n: int = 64,
                    batch: int | None = 32, photos_dir: str | Path | None = None, log=print) -> dict:
    """``explainer bench --model resnet18|mobilenet_v2``: one photo model's detections/s on ``device`` beside its
    floor, written to metrics.json and report.md. ResNet-18 without weights runs on random ones (timing only)."""
    keep_allocations_mapped()
    out.mkdir(parents=True, exist_ok=True)
    random_init = weights is None and model == "resnet18"
    log(f"{model} on {device or 'cpu'}: {n} photos in batches of {batch}…")
    r = imagenet_timing(model, weights, random_init, n=n, device=device, batch=batch, photos_dir=photos_dir)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "device": r["device"],
                           "cpus": os.cpu_count()},  # NLM and inpainting run on the CPU whatever the device
               "photo": {**r, "photos_dir": str(photos_dir) if photos_dir else "the shared ImageNet sample"}}
    r = results["photo"]
    flags = "".join(f" --{k} {v}" for k, v in (("weights", weights), ("photos", photos_dir)) if v)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Benchmark: one photo model", "",
             f"Command: `explainer bench --model {model} --device {device or 'cpu'} --n {n} --batch {r['batch']}"
             f"{flags} --out {out}` on {r['device']} ({platform.platform()}, {os.cpu_count()} CPU cores for NLM "
             f"and inpainting, torch {torch.__version__}).", "",
             f"- {model} ({r['weights']}), {r['photos']} photos from {r['photos_dir']}, prepared to 224×224, in "
             f"batches of {r['batch']}, "
             f"the shipped photo configuration (Grad-CAM, NLM, {', '.join(r.get('signals', []))}): "
             f"**{r['detections_per_s']:.1f} detections/s** ({r['seconds_per_detection']:.3f} s per detection)",
             f"- floor (plain torch, {r['passes_per_image']} forward+backward passes per image, same batch and "
             f"device): {1 / r['floor_seconds_per_image']:.1f} images/s; the detector reaches "
             f"**{r['ratio_to_floor']:.0%}** of it",
             f"- with its checks' {r['inference_passes_per_image']} inference-only forward passes per image "
             f"(the signals' extra passes: noisy copies, one per transplant host): "
             f"{1 / r['floor_with_checks_seconds_per_image']:.1f} "
             f"images/s; the detector reaches {r['ratio_to_floor_with_checks']:.0%} of it", ""]
    (out / "report.md").write_text("\n".join(lines))
    return results


# NLM windows (template, search) of the validation search in reports/validation/mnist_nlm_window_search.md
NLM_WINDOWS = ((5, 11), (5, 7), (3, 7), (3, 5))


def nlm_window_sweep(det: Detector, images: np.ndarray) -> dict[str, dict[str, float]]:
    """The speed side of the NLM accuracy/speed trade-off: NLM ms per image and detections/s per window."""
    sweep = {}
    for template, search in NLM_WINDOWS:
        nlm = replace(det.config.nlm, template=template, search=search)
        d = Detector(det.model, replace(det.config, nlm=nlm), det.calibration)
        x = d.prepare(images[:256])
        sweep[f"{template}/{search}"] = {
            "nlm_ms_per_image": 1000 * best_of(lambda d=d, x=x: d.denoise(x), 2) / len(x),
            "detections_per_s": detector_throughput(d, images[:512], BATCH, repeat=2),
        }
    return sweep


# interleaved rounds of floor and detector, and streaming bursts: a shared machine's speed drifts between them, so
# every figure is a median over enough rounds to be steadier than any one of them (the per-round spread is printed
# in the report, reports/bench/report.md)
ROUNDS = 9
STREAM_ROUNDS = 5
# a burst repeats the bench's images this many times: filling and draining the stages (several consumers' batches
# in flight, cores part idle) costs a fixed time per burst, so a burst must last long enough at the stream's rate
# that this time is a small share of it; shorter bursts understate the stream against the in-process detector
BURST_FACTOR = 16
# the batch every in-process figure is timed at, floors included: the batch a stream read carries (deploy/serve.yaml's
# ``batch``), so the in-process and streamed figures compare like with like; smaller batches weigh the detector's
# per-batch costs (its NLM call, Python, thread hand-offs) more. Large batches are fast only with pipeline.runtime's
# allocator setting (allocations kept mapped), which ``explainer`` and run_bench apply. The best of the floor's
# timings at FLOOR_PEER_BATCHES in each round is reported too, a stricter peer, and the floor by batch.
BATCH = 256
FLOOR_PEER_BATCHES = (64, 128, 256)


def run_bench(out: Path, n: int = 1000, streaming_runs: bool = True, imagenet: bool = True, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    mapped = keep_allocations_mapped()  # as ``explainer`` runs (pipeline.runtime); idempotent
    data_dir = Path(".explainer") / "bench"
    det = Detector.from_pretrained("mnist")
    images = mnist_images(n)
    log("floor and in-process throughput…")
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
                    "allocations_kept_mapped": mapped},
        "config": det.config.to_dict(),
        "n_images": len(images),
        "serve_args": {k: v for k, v in load_config()["args"].items() if k != "redis_url"},
    }
    # interleaved rounds: a shared machine's speed drifts within a minute, so each ratio is taken within a round
    # (floors and detector timed one after another, over as many images each) and the median over the rounds is
    # reported; a best-of-each ratio rewards whichever side happened to catch a fast moment
    def one_round() -> tuple:
        # the floor at the other batches too: the best of its timings at FLOOR_PEER_BATCHES is a stricter peer
        others = {b: floor_throughput(det, batch=b, repeat=1, images=len(images))["images_per_s"]
                  for b in FLOOR_PEER_BATCHES if b != BATCH}
        floor = floor_throughput(det, batch=BATCH, repeat=1, images=len(images))
        return (floor, floor_throughput(det, batch=BATCH, repeat=1, channels_last=True, images=len(images)),
                floor_throughput(det, batch=BATCH, repeat=1, images=len(images), with_checks=True),
                detector_throughput(det, images, BATCH, repeat=1),
                dict(sorted({BATCH: floor["images_per_s"], **others}.items())))

    rounds = [one_round() for _ in range(ROUNDS)]
    for i, key in enumerate(("floor", "floor_channels_last", "floor_with_checks")):
        results[key] = {**rounds[0][i], "images_per_s": float(np.median([r[i]["images_per_s"] for r in rounds])),
                        "rounds": [r[i]["images_per_s"] for r in rounds]}
    by_batch = [r[4] for r in rounds]
    results["floor_by_batch"] = {b: {"images_per_s": float(np.median([f[b] for f in by_batch])),
                                     "rounds": [f[b] for f in by_batch]} for b in by_batch[0]}
    fastest = [max(f.values()) for f in by_batch]
    results["floor_fastest_batch"] = {**results["floor"], "batch": None, "images_per_s": float(np.median(fastest)),
                                      "rounds": fastest, "batches": [max(f, key=f.get) for f in by_batch]}
    detector = [r[3] for r in rounds]
    results["in_process"] = {"batch": BATCH, "throughput": float(np.median(detector)), "rounds": detector}
    for key, peer in (("ratio_to_floor", "floor"), ("ratio_to_floor_channels_last", "floor_channels_last"),
                      ("ratio_to_floor_with_checks", "floor_with_checks"),
                      ("ratio_to_floor_fastest_batch", "floor_fastest_batch")):
        per_round = [d / f for d, f in zip(detector, results[peer]["rounds"], strict=True)]
        results["in_process"][key] = float(np.median(per_round))
        results["in_process"][key + "_rounds"] = per_round
    results["stages_ms_per_image"] = stage_times(det, images[:BATCH])
    results["signals_ms_per_image"] = signal_times(det, images[:BATCH])
    results["stages_ms_per_image"].update(wire_and_redis(images[:512], data_dir))
    results["batch_sweep"] = {b: detector_throughput(det, images[:512], b, repeat=2) for b in (1, 8, 32, 64, 128, 256)}
    results["nlm_window_sweep"] = nlm_window_sweep(det, images)
    if streaming_runs:
        burst = np.concatenate([images] * BURST_FACTOR)  # one streaming burst's images, timed in-process between
        local_cpu: list[float] = []  # CPU ms per image of each in-process run between the bursts

        def in_process() -> float:
            cpu = time.process_time()
            rate = detector_throughput(det, burst, BATCH, repeat=1)
            # detector_throughput runs the images twice: a warm-up, then the timed run
            local_cpu.append(1000 * (time.process_time() - cpu) / (2 * len(burst)))
            return rate

        for replicas in (1, 2):
            log(f"streaming, {replicas} replica(s) of the CPU stages…")
            local_cpu.clear()
            results[f"streaming_{replicas}"] = streaming(images, data_dir, replicas, in_process=in_process,
                                                         rounds=STREAM_ROUNDS, burst_factor=BURST_FACTOR)
            results[f"streaming_{replicas}"]["in_process_cpu_ms_per_image"] = float(np.median(local_cpu))
            # a stricter peer: the in-process figure timed without the stack (the rounds above); the runs between
            # bursts share the machine with the idle stack's processes (Ray's and Serve's own loops)
            s = results[f"streaming_{replicas}"]
            s["ratio_to_standalone_in_process"] = s["throughput"] / results["in_process"]["throughput"]
        # in-process again after the streaming runs, so a drift of the machine shows
        results["in_process"]["throughput_after"] = detector_throughput(det, images, BATCH)
    if streaming_runs and imagenet:
        log("photos through the stream…")
        try:
            results["photo_streaming"] = photo_streaming(data_dir, log=log)
        except FileNotFoundError as exc:
            results["photo_streaming"] = {"error": str(exc)}
    if imagenet:
        log("ImageNet-size models…")
        results["imagenet"] = [imagenet_timing("resnet18", None, True)]
        try:
            results["imagenet"].append(imagenet_timing("mobilenet_v2", None, False))
        except FileNotFoundError as exc:
            results["imagenet"].append({"model": "mobilenet_v2", "error": str(exc)})
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, results)
    return results


def _pcts(values: list[float]) -> str:
    return ", ".join(f"{v:.0%}" for v in values)


def write_report(out: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = r["batch_sweep"]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(list(map(int, sweep)), list(sweep.values()), "o-")
    ax[0].axhline(r["floor"]["images_per_s"], color="k", ls=":", label=f"floor (batch {r['floor']['batch']})")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("batch size")
    ax[0].set_ylabel("detections / s")
    ax[0].legend()
    stages = {k: v for k, v in r["stages_ms_per_image"].items()}
    ax[1].barh(list(stages), list(stages.values()))
    ax[1].set_xlabel("ms per image")
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=90)
    plt.close(fig)
    m = r["machine"]
    lines = ["# Benchmark", "", f"Command: `explainer bench --out {out}` on {m['platform']}, {m['cpus']} CPUs, "
             f"torch {m['torch']} ({m['torch_threads']} threads), allocations kept mapped (pipeline.runtime): "
             f"{'yes' if m.get('allocations_kept_mapped') else 'no'}. Config: {r['config']['method']} "
             f"({r['floor']['passes_per_image'] // 2} forward+backward pass per map), NLM h={r['config']['nlm']['h']}; "
             f"streaming as in deploy/serve.yaml ({r.get('serve_args', {}).get('consumers', '?')} consumers × "
             f"{r.get('serve_args', {}).get('batch', '?')} images per read, Explainer "
             f"{r.get('serve_args', {}).get('torch_threads', '?')} torch threads).", "",
             "## MNIST, in-process", "",
             f"Floors and detector are timed in {len(r['in_process']['rounds'])} interleaved rounds of "
             f"{r.get('n_images', 1000)} images each; figures are medians over the rounds, and each ratio is the "
             "median of the per-round ratios (floors and detector timed one after another in each round), because "
             "this machine's speed drifts by tens of percent within a minute.", "",
             f"- floor (plain torch, {r['floor']['passes_per_image']} forward+backward passes per image, batch "
             f"{r['floor']['batch']}): **{r['floor']['images_per_s']:.0f} images/s**",
             f"- `Detector.detect`, batch {r['in_process']['batch']}: "
             f"**{r['in_process']['throughput']:.0f} detections/s** = "
             f"**{r['in_process']['ratio_to_floor']:.0%} of the floor** (goal ≥ 100/s and ≥ 85%; per round "
             f"{_pcts(r['in_process']['ratio_to_floor_rounds'])})",
             f"- the floor of everything the configured detector runs: the same passes plus "
             f"{r['floor_with_checks']['inference_passes_per_image']} inference-only forward pass(es) per image for "
             f"its checks (the median check, occlusion, transplant hosts): "
             f"{r['floor_with_checks']['images_per_s']:.0f} images/s; "
             f"the detector reaches **{r['in_process']['ratio_to_floor_with_checks']:.0%}** of it (per round "
             f"{_pcts(r['in_process']['ratio_to_floor_with_checks_rounds'])})",
             f"- the best of the floor's timings at batches {', '.join(map(str, r['floor_by_batch']))} in each "
             f"round (the best: {', '.join(map(str, r['floor_fastest_batch']['batches']))}), a stricter peer: "
             f"{r['floor_fastest_batch']['images_per_s']:.0f} images/s (medians by batch: "
             + ", ".join(f"{b}: {v['images_per_s']:.0f}" for b, v in r["floor_by_batch"].items())
             + "); the detector reaches "
             f"**{r['in_process']['ratio_to_floor_fastest_batch']:.0%}** of it (per round "
             f"{_pcts(r['in_process']['ratio_to_floor_fastest_batch_rounds'])})",
             f"- the explanation's passes in the layout the detector runs in (channels-last weights and inputs), a "
             f"stricter peer: {r['floor_channels_last']['images_per_s']:.0f} images/s; the detector reaches "
             f"**{r['in_process']['ratio_to_floor_channels_last']:.0%}** of it", "",
             "| stage | ms per image |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["stages_ms_per_image"].items()]
    if "signals_ms_per_image" in r:
        lines += ["", "What each signal costs, on what the detector hands it (batch of 256; the `model` signals are in "
                  "the explain stage above, the others in the decision):", "", "| signal | ms per image |",
                  "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in r["signals_ms_per_image"].items()]
    if "photo_streaming" in r and "error" not in r["photo_streaming"]:
        p = r["photo_streaming"]
        lines += ["", f"Photos through the stream ({p['model']}, the NIPS 2017 web photos as JPEG, decoded by the "
                  f"worker; calls of {p['images_per_call']} photos, `pipeline.images_per_call`): bursts of "
                  f"{p['burst']} at **{p['stream_s_per_photo']:.3f} s per photo**, against "
                  f"{p['in_process_best_s']:.3f} s in-process at its best call size (medians between the bursts: "
                  f"{p['in_process_call_s_per_photo']:.3f} s in calls of {p['images_per_call']}, "
                  f"{p['single_ms'] / 1000:.3f} s one at a time) = **{p['ratio_to_in_process']:.0%}** of the "
                  f"in-process rate (goal ≥ 90%); at {p['light_rate']:g} photo/s for "
                  f"{p['light_sent']:.0f} s ({p['light_received']}/{p['light_sent']} verdicts) enqueue → verdict "
                  f"p50 **{p['light_p50_ms']:.0f} ms**, p99 **{p['light_p99_ms']:.0f} ms** = "
                  f"{p['light_p99_ms'] / p['single_ms']:.1f}× one photo in-process (goal ≤ 2×)."]
    lines += ["", "| batch size | detections/s |", "|---|---|"] + [f"| {b} | {v:.0f} |" for b, v in sweep.items()]
    if "nlm_window_sweep" in r:
        lines += ["", "NLM window (patch / search) against speed; the accuracy side is the validation search on even "
                  "digits, reports/validation/mnist_nlm_window_search.md (shipped: "
                  f"{r['config']['nlm']['template']}/{r['config']['nlm']['search']}):", "",
                  "| NLM window | NLM ms per image | detections/s | share of the floor |", "|---|---|---|---|"]
        floor = r["floor"]["images_per_s"]
        lines += [f"| {w} | {v['nlm_ms_per_image']:.3f} | {v['detections_per_s']:.0f} | "
                  f"{v['detections_per_s'] / floor:.0%} |" for w, v in r["nlm_window_sweep"].items()]
    for replicas in (1, 2):
        s = r.get(f"streaming_{replicas}")
        if s:
            lines += ["", f"## Streaming (Redis → Ray Serve → verdict stream), {replicas} replica(s) of Denoiser and "
                      "Scorer", "",
                      f"- {len(s['bursts'])} bursts of {s['burst_images']} images (at least {s['burst_received']} "
                      f"verdicts each): {', '.join(f'{x:.0f}' for x in s['bursts'])} images/s; in-process on the same "
                      f"images between them (stack idle): "
                      f"{', '.join(f'{x:.0f}' for x in s['in_process_between'])} detections/s",
                      f"- median burst **{s['throughput']:.0f} images/s; median ratio to the in-process runs around "
                      f"each burst {s['ratio_to_in_process']:.0%}** (per burst {_pcts(s['ratio_rounds'])}; goal ≥ "
                      f"80%); latency under the bursts "
                      f"p50 {s['burst_p50_ms']:.0f} ms, p99 {s['burst_p99_ms']:.0f} ms",
                      *([f"- against the in-process figure timed without the stack ({r['in_process']['throughput']:.0f}"
                         f" detections/s, above), a stricter peer: **{s['ratio_to_standalone_in_process']:.0%}** (the "
                         "runs between bursts share the machine with the idle stack's own processes)"]
                        if "ratio_to_standalone_in_process" in s else []),
                      f"- steady load at {s['steady_rate']:.0f} images/s (60% of the burst rate), "
                      f"{s['steady_received']}/{s['steady_sent']} verdicts: **p50 {s['steady_p50_ms']:.0f} ms, "
                      f"p99 {s['steady_p99_ms']:.0f} ms**; pending after: {s['pending_after']}"]
            if "latency_by_load" in s:
                lines += ["", "Latency by offered load (enqueue → verdict, and its hops: waiting in the stream, the "
                          "detection from read to verdict, the write to Redis), ms:", "",
                          "| load | images/s | verdicts | p50 | p99 | queued p50 / p99 | detect p50 / p99 | "
                          "write p50 / p99 |", "|---|---|---|---|---|---|---|---|"]
                lines += [f"| {float(f):.0%} | {v['rate']:.0f} | {v['received']}/{v['sent']} | **{v['p50_ms']:.0f}** | "
                          f"**{v['p99_ms']:.0f}** | {v['queued_p50_ms']:.1f} / {v['queued_p99_ms']:.1f} | "
                          f"{v['detect_p50_ms']:.1f} / {v['detect_p99_ms']:.1f} | {v['write_p50_ms']:.1f} / "
                          f"{v['write_p99_ms']:.1f} |" for f, v in s["latency_by_load"].items()]
            if "cpu_ms_per_image_total" in s:
                cpus = r["machine"]["cpus"]
                lines += ["", f"CPU per image under the bursts, by process (medians over the bursts, from /proc): "
                          f"**{s['cpu_ms_per_image_total']:.3f} ms** for the stack, Redis, Ray and the bench's "
                          f"producer and collector (the median of the bursts' totals; processes of neither, "
                          f"\"other\", not counted), against {s['in_process_cpu_ms_per_image']:.3f} ms for the "
                          f"in-process detector between them; {cpus} cores at 100% give {1000 * cpus:,} / that many "
                          "images/s.", "", "| process | CPU ms per image |", "|---|---|"]
                lines += [f"| {k} | {v:.3f} |" for k, v in s["cpu_ms_per_image"].items() if v >= 0.0005]
    if "throughput_after" in r["in_process"]:
        lines += ["", f"In-process again after the streaming runs: {r['in_process']['throughput_after']:.0f} "
                  "detections/s (machine drift check)."]
    for item in r.get("imagenet", []):
        if "error" in item:
            lines += ["", f"- {item['model']}: {item['error']}"]
        else:
            lines += ["", f"- {item['model']} ({item['weights']}), 224×224: **{item['seconds_per_detection']:.2f} s "
                      f"per detection**; floor {item['floor_seconds_per_image']:.2f} s "
                      f"({item['passes_per_image']} passes) = {item['ratio_to_floor']:.0%} of the floor; with the "
                      f"checks' {item.get('inference_passes_per_image', 1)} inference-only forward passes "
                      f"{item['floor_with_checks_seconds_per_image']:.2f} s = "
                      f"{item['ratio_to_floor_with_checks']:.0%}"]
    lines += ["", "![bench](bench.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
