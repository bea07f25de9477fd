"""The evaluation harness's commands on the ``explainer`` command line: evaluate, bench, demo, and the attacks
``explainer feed --attack`` makes adversarials with. The product's CLI (:mod:`worker.cli`) finds them through the
``explainer.plugins`` entry point (:mod:`worker.plugins`); it never imports this package."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from worker.cli import DEVICE_HELP, TRUST_HELP, check_device, console, fail, open_detector
from worker.embedded import DEFAULT_CONFIG
from worker.plugins import Plugins

MNIST_DEFAULT_ATTACKS = "bim,mim,pgd,pgd-0.1,cw-l0,cw-l2,cw-linf,pgd-l2,square,adaptive-0.1,adaptive-0.2,adaptive"
PHOTO_DEFAULT_ATTACKS = "patch,bim,pgd,pgd-2,bim-early,cw-l2"


def register(plugins: Plugins) -> None:
    """Add the harness's commands, attacks and reference calibration images to the CLI's plugins."""
    from functools import partial

    from evaluation.attacks import ATTACKS
    from evaluation.datasets import clean_calibration_images

    def add_commands(app: typer.Typer) -> None:
        for command in (evaluate, bench, demo):
            app.command()(command)

    plugins.commands.append(add_commands)
    plugins.attacks.update({name: partial(attack_digits, name) for name in ATTACKS})
    plugins.reference_images = lambda model, n: clean_calibration_images(model, None, n)


def attack_digits(attack: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 digits (N, 28, 28) attacked on the shipped MNIST model, back as uint8."""
    import torch

    from evaluation.attacks import ATTACKS
    from pipeline import load_model

    model = load_model("mnist")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x_adv = ATTACKS[attack]()(model.net, x, torch.from_numpy(labels))
    return (x_adv * 255).round().to(torch.uint8).squeeze(1).numpy()


def evaluate(
    model: str = typer.Option("mnist", help="mnist | mobilenet_v2 | resnet18"),
    attacks: str | None = typer.Option(
        None, help="comma-separated attack names (default bim,mim,pgd,pgd-0.1,cw-l0,cw-l2,cw-linf,pgd-l2,square,"
        "adaptive-0.1,adaptive-0.2,adaptive; ImageNet: patch,bim,pgd,pgd-2,bim-early,cw-l2)"),
    n: int | None = typer.Option(
        None, help="evaluation images (default: 1000 odd digits attacked, every odd digit scored clean; every "
        "evaluation photo of the three photo sources, 500)"),
    out: Path | None = typer.Option(None, help="report folder (default reports/mnist or reports/imagenet)"),
    weights: Path | None = typer.Option(None, help="model weights (ImageNet models)"),
    methods: str = typer.Option("ig,deeplift,saliency,gradient_shap,smoothgrad_ig,guided_gradcam",
                                help="explanation methods to compare ('' to skip)"),
    n_methods: int = typer.Option(200, help="images per set in the method comparison"),
    device: str | None = typer.Option(None, help=DEVICE_HELP + "; the MNIST baselines stay on the CPU"),
    detector: str | None = typer.Option(
        None, help="a calibrated detector instead of --model: a digits detector (e.g. mnist-robust) on the MNIST "
        "protocol, or a photo detector bundle (PATH or PATH@sha256:HEX) on --photos"),
    photos: Path | None = typer.Option(
        None, help="with --detector: a CSV of labelled photos the calibration never saw (columns path,label; label "
        "is the model's output index; paths relative to the CSV)"),
    patch_target: int = typer.Option(0, help="with --detector: the class the universal patch aims at"),
    trust_code: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    """Detection rate, FPR, ROC-AUC and defended error on real data, beside the paper's Table 1 and the re-run
    baselines; for another digits detector (--detector mnist-robust), or a calibrated photo detector of your own
    (--detector) on your own labelled photos (--photos)."""
    import sys

    check_device(device)
    det = open_detector(detector, None, None, device, trust_code) if detector is not None else None
    digits = det.model.channels == 1 and photos is None if det is not None else model == "mnist"
    if attacks is None:
        attacks = MNIST_DEFAULT_ATTACKS if digits else PHOTO_DEFAULT_ATTACKS
    names = [a.strip() for a in attacks.split(",") if a.strip()]
    if det is not None and not digits:
        evaluate_own_detector(det, photos, names, out, patch_target, detector)
        return
    if not digits:
        evaluate_photos(model, weights, names, n, out or Path("reports/imagenet"), device)
        return
    from evaluation.attacks import ATTACKS
    from evaluation.mnist import evaluate_mnist

    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        fail(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    n, out = n or 1000, out or Path("reports") / (det.model.name if det is not None else "mnist")
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    metrics = evaluate_mnist(names, n, out, n_methods=n_methods, methods=method_list,
                             log=lambda msg: console.print(msg), command="explainer " + shlex.join(sys.argv[1:]),
                             device=device, det=det)
    table = Table("attack", "success", "n adv", "detection", "ROC-AUC", "MagNet", "FS",
                  title=f"clean FPR {metrics['clean_fpr']:.1%} (target {metrics['target_fpr']:.0%})")
    for name, a in metrics["attacks"].items():
        table.add_row(name, f"{a['attack_success_rate']:.1%}", str(a["n_adv"]), f"{a['detection_rate']:.1%}",
                      f"{a['roc_auc']:.3f}",
                      f"{metrics['baselines']['magnet']['attacks'][name]['detection_rate']:.1%}",
                      f"{metrics['baselines']['feature_squeezing']['attacks'][name]['detection_rate']:.1%}")
    console.print(table)
    console.print(f"wrote {out}/metrics.json, {out}/report.md and plots")


def evaluate_photos(model: str, weights: Path | None, names: list[str], n: int | None, out: Path,
                    device: str | None = None) -> None:
    """The ImageNet-size half of ``evaluate``: patch / BIM / PGD on the shared sample photos."""
    import sys

    from evaluation.imagenet import IMAGENET_ATTACKS, evaluate_imagenet

    unknown = [a for a in names if a not in IMAGENET_ATTACKS]
    if unknown:
        fail(f"unknown attack(s) {unknown} for ImageNet models; choose from {', '.join(IMAGENET_ATTACKS)}")
    try:
        metrics = evaluate_imagenet(model, weights, names, n, out, log=lambda msg: console.print(msg),
                                    command="explainer " + shlex.join(sys.argv[1:]), device=device)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    print_photo_table(metrics, out)


def evaluate_own_detector(det, photos: Path | None, names: list[str], out: Path | None, patch_target: int,
                          given: str) -> None:
    """``evaluate --detector BUNDLE --photos CSV``: a user's calibrated photo detector on their labelled photos."""
    import sys

    from evaluation.imagenet import IMAGENET_ATTACKS, evaluate_bundle, load_labelled_csv

    if photos is None:
        fail(f"--photos: a CSV of labelled photos (path,label) that {given}'s calibration never saw")
    if out is None:
        fail("--out: the report folder")
    if unknown := [a for a in names if a not in IMAGENET_ATTACKS]:
        fail(f"unknown attack(s) {unknown} for photo detectors; choose from {', '.join(IMAGENET_ATTACKS)}")
    try:
        rows = load_labelled_csv(photos)
        metrics = evaluate_bundle(det, rows, names, out, log=lambda msg: console.print(msg),
                                  command="explainer " + shlex.join(sys.argv[1:]),
                                  attack_options={"patch": {"target_class": patch_target}})
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    print_photo_table(metrics, out)


def print_photo_table(metrics: dict, out: Path) -> None:
    table = Table("attack", "success", "n adv", *(f"detection @ {100 * p['target_fpr']:g}%"
                                                  for p in metrics["operating_points"].values()), "ROC-AUC",
                  title=f"{metrics['model']}: clean FPR " + ", ".join(
                      f"{100 * p['clean_fpr']:.1f}% @ {100 * p['target_fpr']:g}%"
                      for p in metrics["operating_points"].values()))
    for name, a in metrics["attacks"].items():
        table.add_row(name, f"{a['attack_success_rate']:.1%}", str(a["n_adv"]),
                      *(f"{p['attacks'][name]['detection_rate']:.1%}" for p in metrics["operating_points"].values()),
                      f"{a['roc_auc']:.3f}")
    console.print(table)
    console.print(f"wrote {out}/metrics.json, {out}/report.md and plots")


def bench(
    out: Path | None = typer.Option(None, help="default: reports/bench, with --ingest reports/scaling"),
    n: int | None = typer.Option(None, min=1, help="images per throughput run (MNIST: 1000; photo models: 64)"),
    streaming: bool = typer.Option(True, help="also measure the Redis + Ray Serve path"),
    imagenet: bool = typer.Option(True, help="also time ResNet-18 (random weights) and MobileNetV2"),
    model: str = typer.Option("mnist", help="mnist (the whole bench) or a photo model alone: resnet18, mobilenet_v2"),
    weights: str | None = typer.Option(None, help="photo model weights (ResNet-18 without them: random, timing only)"),
    device: str | None = typer.Option(None, help="photo models: the torch device, e.g. cuda (default: cpu)"),
    batch: int | None = typer.Option(None, min=1, help="photo models: photos per detect call (default 32)"),
    photos: Path | None = typer.Option(None, help="photo models: a folder laid out as the shared imagenet-sample/"),
    ingest: bool = typer.Option(False, "--ingest", help="the queue alone instead: photos pushed and read to a "
                                "verdict with 1, 2 and 4 shards, on one Redis and a 3-master Redis Cluster, inline "
                                "and by reference (--n photos per row)"),
) -> None:
    """Floor, in-process and streaming throughput, stages, batch sizes, latency; writes metrics.json + report.
    With ``--model resnet18`` or ``mobilenet_v2``: that photo model's detections/s on ``--device``, beside its
    floor (``--n`` real photos). With ``--ingest``: the stream's own throughput (detection stubbed out)."""
    from evaluation.stream_bench import run_bench, run_photo_bench

    if ingest:
        from evaluation.ingest_bench import PHOTOS_PER_ROW, run_ingest_bench

        out = out or Path("reports/scaling")
        run_ingest_bench(out, photos=n or PHOTOS_PER_ROW, log=lambda m: console.print(m))
        console.print(f"wrote {out}/ingest.json and {out}/report.md")
        return
    out = out or Path("reports/bench")

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
