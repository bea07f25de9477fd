"""The ``explainer`` command line: detect, calibrate, evaluate, serve, feed, watch, demo, bench."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.embedded import DEFAULT_CONFIG
from worker.local_redis import resolve_redis_url

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def _process_settings() -> None:
    # before any command: every batch's memory stays mapped between passes (pipeline.runtime)
    from pipeline import keep_allocations_mapped

    keep_allocations_mapped()


console = Console()


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def detect(
    files: list[Path] = typer.Argument(..., help="PNG/JPEG images"),
    model: str = typer.Option("mnist", help="mnist | resnet18 | mobilenet_v2"),
    weights: Path | None = typer.Option(None, help="model weights (state_dict)"),
    calibration: Path | None = typer.Option(None, help="calibration JSON (default: the shipped one)"),
    method: str | None = typer.Option(None, help="explanation method (default: the calibration's)"),
    rule: str | None = typer.Option(None, help="calibrated | sign"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
) -> None:
    """Print one verdict per image file."""
    from pipeline import Detector, InputError, read_image_file

    try:
        det = Detector.from_pretrained(model, weights=weights, calibration=calibration)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if method:
        from dataclasses import replace

        det.config = replace(det.config, method=method)
        if det.calibration and det.calibration.method != method and rule != "sign":
            fail(f"the calibration was made for method {det.calibration.method!r}; use --rule sign or recalibrate")
    table = Table("file", "class", "conf", "H(orig)", "H(denoised)", "score", "verdict")
    status = 0
    for path in files:
        try:
            res = det.detect(read_image_file(path), rule=rule)
        except InputError as exc:
            status = 1
            if as_json:
                print(json.dumps({"file": str(path), "error": str(exc)}))
            else:
                table.add_row(str(path), "-", "-", "-", "-", "-", f"[red]error: {exc}[/red]")
            continue
        row = res.rows()[0]
        if as_json:
            print(json.dumps({"file": str(path), **row}))
        else:
            verdict = "[red]ADVERSARIAL[/red]" if row["is_adversarial"] else "[green]clean[/green]"
            table.add_row(
                str(path),
                str(row["predicted_class"]),
                f"{row['confidence']:.3f}",
                f"{row['entropy_original']:.3f}",
                f"{row['entropy_denoised']:.3f}",
                f"{row['score']:.3f} / {row['threshold']:.3f}",
                verdict,
            )
    if not as_json:
        console.print(table)
    raise typer.Exit(status)


@app.command()
def calibrate(
    model: str = typer.Option("mnist"),
    weights: Path | None = typer.Option(None),
    out: Path = typer.Option(..., help="where to write the calibration JSON"),
    target_fpr: float = typer.Option(0.05),
    method: str | None = typer.Option(None, help="explanation method (see pipeline.explain); default: the model's"),
    steps: int = typer.Option(4, help="integration steps (IG, SmoothGrad-IG; ignored by saliency)"),
    samples: int = typer.Option(8, help="samples for SHAP / SmoothGrad"),
    entropy: str = typer.Option("spatial", help="spatial | histogram | paper"),
    nlm_h: float | None = typer.Option(None, help="NLM filter strength (default: the model's, 50 for MNIST)"),
    nlm_template: int | None = typer.Option(None, help="NLM patch size (odd; default: the model's)"),
    nlm_search: int | None = typer.Option(None, help="NLM search window (odd; default: the model's)"),
    median: int | None = typer.Option(
        None, help="side of the median_shift signal's filter (2 for MNIST; 0 = off; default: the model's)"),
    confidence: float | None = typer.Option(
        None, help="set the threshold so that the target FPR holds with this confidence (e.g. 0.95), not only "
        "in expectation"),
    folds: int | None = typer.Option(
        None, help="cross-fit the CDFs and the threshold over K folds (0: two halves; default: the model's, "
        "two halves for MNIST, 5 folds for photos)"),
    n: int | None = typer.Option(None, help="use only the first N calibration images"),
    images_dir: Path | None = typer.Option(
        None,
        help="folder of clean PNG/JPEG images (default: even MNIST test digits / even-position ImageNet photos)",
    ),
) -> None:
    """Calibrate the decision threshold at a target false-positive rate on clean images only.

    Defaults are each model's preset (pipeline.presets: digits for mnist, photos for the ImageNet models); the
    options replace parts of it. Without --images-dir, the clean images are the reference data sets' calibration
    halves (evaluation.datasets)."""
    from dataclasses import replace

    from evaluation.datasets import clean_calibration_images
    from pipeline import Detector, ExplainParams, default_config, default_folds, load_model


    base = default_config(model)
    nlm = base.nlm
    if nlm_h is not None:
        nlm = replace(nlm, h=nlm_h, h_color=nlm_h)
    nlm = replace(nlm, template=nlm_template or nlm.template, search=nlm_search or nlm.search)
    signals = dict(base.signals)
    if median == 0:
        signals.pop("median_shift", None)
    elif median is not None:
        signals["median_shift"] = {"size": median}
    cfg = replace(base, method=method or base.method, explain=ExplainParams(steps=steps, samples=samples),
                  entropy=entropy, nlm=nlm, signals=signals)
    try:
        det = Detector(load_model(model, weights), cfg)
        images, desc = clean_calibration_images(model, images_dir, n)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(images))
        cal = det.calibrate(
            images,
            target_fpr,
            images=desc,
            batch_size=128 if model == "mnist" else 8,
            progress=lambda k: bar.update(task, completed=k),
            confidence=confidence,
            folds=default_folds(model) if folds is None else (folds or None),
        )
    cal.save(out)
    console.print(
        f"threshold {cal.threshold:.4f} at target FPR {target_fpr} "
        f"(held-out FPR {cal.threshold_fpr:.4f}, "
        + (f"{cal.n_reference} images cross-fitted over {cal.folds} folds" if cal.folds else
           f"{cal.n_reference}+{cal.n_threshold} images") + f") -> {out}"
    )


@app.command()
def evaluate(
    model: str = typer.Option("mnist", help="mnist | mobilenet_v2 | resnet18"),
    attacks: str | None = typer.Option(
        None, help="comma-separated attack names (default bim,mim,cw-l0,cw-l2,cw-linf; ImageNet: patch,bim,pgd)"),
    n: int | None = typer.Option(
        None, help="odd-indexed images attacked (default 1000 digits, every odd digit scored clean; 250 photos)"),
    out: Path | None = typer.Option(None, help="report folder (default reports/mnist or reports/imagenet)"),
    weights: Path | None = typer.Option(None, help="model weights (ImageNet models)"),
    methods: str = typer.Option("ig,deeplift,saliency,gradient_shap,smoothgrad_ig,guided_gradcam",
                                help="explanation methods to compare ('' to skip)"),
    n_methods: int = typer.Option(200, help="images per set in the method comparison"),
) -> None:
    """Detection rate, FPR and ROC-AUC on real data, beside the paper's Table 1 and the re-run baselines."""
    import sys

    if attacks is None:
        attacks = "bim,mim,cw-l0,cw-l2,cw-linf" if model == "mnist" else "patch,bim,pgd"
    names = [a.strip() for a in attacks.split(",") if a.strip()]
    if model != "mnist":
        evaluate_photos(model, weights, names, n or 250, out or Path("reports/imagenet"))
        return
    from evaluation.attacks import ATTACKS
    from evaluation.mnist import evaluate_mnist

    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        fail(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    n, out = n or 1000, out or Path("reports/mnist")
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    metrics = evaluate_mnist(names, n, out, n_methods=n_methods, methods=method_list,
                             log=lambda msg: console.print(msg), command="explainer " + shlex.join(sys.argv[1:]))
    table = Table("attack", "success", "n adv", "detection", "ROC-AUC", "MagNet", "FS",
                  title=f"clean FPR {metrics['clean_fpr']:.1%} (target {metrics['target_fpr']:.0%})")
    for name, a in metrics["attacks"].items():
        table.add_row(name, f"{a['attack_success_rate']:.1%}", str(a["n_adv"]), f"{a['detection_rate']:.1%}",
                      f"{a['roc_auc']:.3f}",
                      f"{metrics['baselines']['magnet']['attacks'][name]['detection_rate']:.1%}",
                      f"{metrics['baselines']['feature_squeezing']['attacks'][name]['detection_rate']:.1%}")
    console.print(table)
    console.print(f"wrote {out}/metrics.json, {out}/report.md and plots")


def evaluate_photos(model: str, weights: Path | None, names: list[str], n: int, out: Path) -> None:
    """The ImageNet-size half of ``evaluate``: patch / BIM / PGD on the shared sample photos."""
    import sys

    from evaluation.imagenet import IMAGENET_ATTACKS, evaluate_imagenet

    unknown = [a for a in names if a not in IMAGENET_ATTACKS]
    if unknown:
        fail(f"unknown attack(s) {unknown} for ImageNet models; choose from {', '.join(IMAGENET_ATTACKS)}")
    try:
        metrics = evaluate_imagenet(model, weights, names, n, out, log=lambda msg: console.print(msg),
                                    command="explainer " + shlex.join(sys.argv[1:]))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    table = Table("attack", "success", "n adv", "detection", "ROC-AUC",
                  title=f"{model}: clean FPR {metrics['clean_fpr']:.1%} (target {metrics['target_fpr']:.0%})")
    for name, a in metrics["attacks"].items():
        table.add_row(name, f"{a['attack_success_rate']:.1%}", str(a["n_adv"]), f"{a['detection_rate']:.1%}",
                      f"{a['roc_auc']:.3f}")
    console.print(table)
    console.print(f"wrote {out}/metrics.json, {out}/report.md and plots")


@app.command()
def bench(
    out: Path = typer.Option(Path("reports/bench")),
    n: int | None = typer.Option(None, min=1, help="images per throughput run (MNIST: 1000; photo models: 64)"),
    streaming: bool = typer.Option(True, help="also measure the Redis + Ray Serve path"),
    imagenet: bool = typer.Option(True, help="also time ResNet-18 (random weights) and MobileNetV2"),
    model: str = typer.Option("mnist", help="mnist (the whole bench) or a photo model alone: resnet18, mobilenet_v2"),
    weights: str | None = typer.Option(None, help="photo model weights (ResNet-18 without them: random, timing only)"),
    device: str | None = typer.Option(None, help="photo models: the torch device, e.g. cuda (default: cpu)"),
    batch: int | None = typer.Option(None, min=1, help="photo models: photos per detect call (default 32)"),
    photos: Path | None = typer.Option(None, help="photo models: a folder laid out as the shared imagenet-sample/"),
) -> None:
    """Floor, in-process and streaming throughput, stages, batch sizes, latency; writes metrics.json + report.
    With ``--model resnet18`` or ``mobilenet_v2``: that photo model's detections/s on ``--device``, beside its
    floor (``--n`` real photos)."""
    from evaluation.streaming import run_bench, run_photo_bench

    if model == "mnist":
        given = [f"--{k}" for k, v in (("weights", weights), ("device", device), ("batch", batch),
                                        ("photos", photos)) if v is not None]
        if given:
            fail(f"{', '.join(given)} apply to a photo model alone (--model resnet18 or mobilenet_v2); the MNIST "
                 "bench runs on the CPU")
        r = run_bench(out, n or 1000, streaming, imagenet, log=lambda m: console.print(m))
        console.print(f"in-process {r['in_process']['throughput']:.0f}/s = {r['in_process']['ratio_to_floor']:.0%} "
                      f"of the floor; wrote {out}/metrics.json and {out}/report.md")
        return
    from pipeline import MODEL_NAMES

    if model not in MODEL_NAMES:
        fail(f"unknown model {model!r}; choose {', '.join(MODEL_NAMES)}")
    import torch

    try:
        if device and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {device}: CUDA is not available on this machine")
        r = run_photo_bench(out, model, weights, device, n=min(n or 64, 500), batch=batch or 32, photos_dir=photos,
                            log=lambda m: console.print(m))["photo"]
    except (FileNotFoundError, ValueError) as exc:  # missing photos or weights, an unreadable photo, a bad device
        fail(str(exc))
    console.print(f"{model} on {r['device']}: {r['detections_per_s']:.1f} detections/s = "
                  f"{r['ratio_to_floor']:.0%} of the floor; wrote {out}/metrics.json and {out}/report.md")


REDIS_URL_HELP = ("Redis URL (default: $EXPLAINER_REDIS_URL, else the server `explainer serve` started from this "
                  "folder, else redis://127.0.0.1:6379/0)")


@app.command()
def serve(
    redis_url: str | None = typer.Option(None, help="Redis to consume (default: start a local redis-server)"),
    config: Path = typer.Option(DEFAULT_CONFIG, help="Ray Serve config file"),
    http_port: int = typer.Option(8000),
    data_dir: Path = typer.Option(Path(".explainer"), help="where the local redis-server keeps its AOF"),
    metrics_port: int | None = typer.Option(
        None, help="port of Ray's Prometheus metrics endpoint when serve starts Ray (default: a free one, printed)"),
) -> None:
    """Run the streaming worker until Ctrl-C / SIGTERM (local Redis and Ray when none is given)."""
    import signal
    import threading

    from worker.embedded import embedded_stack

    stop = threading.Event()
    with console.status("starting…"), embedded_stack(redis_url, config, data_dir, http_port,
                                                          metrics_port=metrics_port) as stack:
        # installed after Ray starts: ray.init replaces SIGTERM's handler with one that aborts the process
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        shown = stack.redis_url if stack.redis is not None else "the given Redis"  # a given URL may hold a password
        console.print(f"serving: redis {shown}  http {stack.http_url}  metrics {stack.metrics_url or 'Ray cluster'}"
                      "  (Ctrl-C to stop)")
        while not stop.wait(0.5):
            pass
        console.print("stopping: finishing batches in flight…")
    console.print("stopped cleanly")


@app.command()
def feed(
    redis_url: str | None = typer.Option(None, help=REDIS_URL_HELP),
    n: int = typer.Option(100, help="how many images"),
    source: str = typer.Option("mnist", help="mnist (held-out test digits) | adversarial (shipped) | a folder"),
    attack: str | None = typer.Option(None, help="make adversarials on the fly with this attack (pgd, bim, ...)"),
    encoding: str = typer.Option("raw", help="raw | png | jpeg"),
) -> None:
    """Push images into the image stream."""
    from pipeline import load_adversarial_digits, load_sample_digits
    from worker.feed import push_images
    from worker.streams import StreamNames, connect

    if source == "mnist":
        digits = load_sample_digits().parity("odd").head(n)
        images, ids = digits.images, [f"mnist-{i}" for i in digits.indices]
        if attack:
            images = _attack_digits(attack, digits.images, digits.labels)
            ids = [f"{attack}-{i}" for i in digits.indices]
    elif source == "adversarial":
        adv = load_adversarial_digits().head(n)
        images, ids = adv.images, [f"adv-{a}-{i}" for a, i in zip(adv.attacks, adv.indices, strict=True)]
    else:
        from pipeline import read_image_file

        files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
        images, ids = [read_image_file(p) for p in files], [p.name for p in files]
    stream_ids = push_images(connect(resolve_redis_url(redis_url)), StreamNames(), images, ids=ids,
                             encoding=encoding)
    console.print(f"pushed {len(stream_ids)} images to explainer:images")


def _attack_digits(attack: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    import torch

    from evaluation.attacks import ATTACKS
    from pipeline import load_model

    if attack not in ATTACKS:
        fail(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    model = load_model("mnist")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x_adv = ATTACKS[attack]()(model.net, x, torch.from_numpy(labels))
    return (x_adv * 255).round().to(torch.uint8).squeeze(1).numpy()


@app.command()
def watch(
    redis_url: str | None = typer.Option(None, help=REDIS_URL_HELP),
    all_verdicts: bool = typer.Option(
        False, "--all", help="follow every verdict (the verdict stream), not only alerts"
    ),
) -> None:
    """Print verdicts live: adversarial alerts from the pub/sub channel, or every verdict from the stream."""
    from worker import wire
    from worker.streams import StreamNames, connect

    client, names = connect(resolve_redis_url(redis_url)), StreamNames()

    def show(v: dict) -> None:
        mark = "[red]ADVERSARIAL[/red]" if v.get("is_adversarial") else "[green]clean[/green]"
        if v.get("error"):
            mark = f"[yellow]error: {v['error']}[/yellow]"
        console.print(
            f"{v.get('id')}  class {v.get('predicted_class')}  score {v.get('score')}  {mark}  {v.get('latency_ms')} ms"
        )

    try:
        if all_verdicts:
            cursor = "$"
            while True:
                for _s, entries in client.xread({names.verdicts: cursor}, block=1000, count=100) or []:
                    for sid, fields in entries:
                        cursor = sid
                        show(wire.decode_verdict(fields[b"data"]))
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(names.alerts)
        console.print(f"watching {names.alerts} (Ctrl-C to stop)")
        for message in pubsub.listen():
            show(wire.decode_verdict(message["data"]))
    except KeyboardInterrupt:
        pass


@app.command()
def demo(
    n: int = typer.Option(200, help="clean digits, and as many adversarial ones"),
    redis_url: str | None = typer.Option(None, help="use this Redis instead of starting one"),
    config: Path = typer.Option(DEFAULT_CONFIG),
    http_port: int = typer.Option(8000),
    data_dir: Path = typer.Option(Path(".explainer")),
) -> None:
    """The whole product end to end on embedded defaults: Redis stream → Ray Serve → verdicts and alerts."""
    from evaluation.demo import run_demo

    report = run_demo(n, redis_url, config, http_port, data_dir, console)
    if report.received != report.sent or report.pending:
        fail(f"{report.sent - report.received} verdicts missing, {report.pending} entries left pending")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
