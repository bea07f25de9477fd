"""The ``explainer`` command line: detect, calibrate, evaluate, serve, feed, watch, demo, bench."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
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
            table.add_row(str(path), str(row["predicted_class"]), f"{row['confidence']:.3f}",
                          f"{row['entropy_original']:.3f}", f"{row['entropy_denoised']:.3f}",
                          f"{row['score']:.3f} / {row['threshold']:.3f}", verdict)
    if not as_json:
        console.print(table)
    raise typer.Exit(status)


@app.command()
def calibrate(
    model: str = typer.Option("mnist"),
    weights: Path | None = typer.Option(None),
    out: Path = typer.Option(..., help="where to write the calibration JSON"),
    target_fpr: float = typer.Option(0.05),
    method: str = typer.Option("ig"),
    steps: int = typer.Option(8, help="IG steps"),
    samples: int = typer.Option(8, help="samples for SHAP / SmoothGrad"),
    entropy: str = typer.Option("spatial", help="spatial | histogram | paper"),
    nlm_h: float = typer.Option(15.0, help="NLM filter strength"),
    n: int | None = typer.Option(None, help="use only the first N calibration images"),
    images_dir: Path | None = typer.Option(None, help="a folder of clean PNG/JPEG images (else the even MNIST test digits or even-indexed ImageNet sample photos)"),
) -> None:
    """Calibrate the decision threshold at a target false-positive rate on clean images only."""
    from pipeline import Detector, DetectorConfig, ExplainParams, NLMParams, load_model
    from pipeline.calibration_data import clean_calibration_images

    cfg = DetectorConfig(method=method, explain=ExplainParams(steps=steps, samples=samples), entropy=entropy,
                         nlm=NLMParams(h=nlm_h, h_color=nlm_h))
    try:
        det = Detector(load_model(model, weights), cfg)
        images, desc = clean_calibration_images(model, images_dir, n)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(images))
        cal = det.calibrate(images, target_fpr, images=desc, batch_size=128 if model == "mnist" else 8,
                            progress=lambda k: bar.update(task, completed=k))
    cal.save(out)
    console.print(f"threshold {cal.threshold:.4f} at target FPR {target_fpr} "
                  f"(held-out FPR {cal.threshold_fpr:.4f}, {cal.n_reference}+{cal.n_threshold} images) -> {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
