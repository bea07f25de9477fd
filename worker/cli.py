"""explainer: detect adversarial images before a classifier's answer is trusted. The product's commands are
detect, calibrate, digest, serve, feed and watch; installed plugins add theirs (the evaluation harness: evaluate,
bench, demo)."""

from __future__ import annotations

import json
from dataclasses import is_dataclass
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline import DEFAULT_FPRS, RULES, InputError, fpr_label
from worker import wire
from worker.embedded import DEFAULT_CONFIG
from worker.local_redis import resolve_redis_url
from worker.plugins import load_plugins
from worker.streams import MAX_SHARDS, StreamSettings

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


DEVICE_HELP = "torch device of the model, e.g. cuda or cuda:1 (default: cpu; NLM runs on the CPU either way)"
TRUST_HELP = ("load a bundle whose network is code (a Python callable it names, a torch.export program, a "
              "TorchScript module): only for bundles from a source you trust (docs/bundle.md)")
DETECTOR_HELP = ("a built-in detector (mnist, mnist-robust, resnet18, mobilenet_v2) or a detector bundle (explainer "
                 "calibrate --out BUNDLE), pinned as BUNDLE@sha256:HEX to load only that one")
MODEL_HELP = ("a built-in model (mnist, resnet18, mobilenet_v2), package.module:callable that builds your network, or "
              "your model file: a torch.export program (.pt2) or TorchScript")


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        fail(f"--device {device}: {exc}")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")


def open_detector(detector: str | None, weights: Path | None, calibration: Path | None, device: str | None,
                   trust_code: bool = False):
    """The detector ``--detector`` names, as every command names one: a built-in model's (its shipped bundle, or
    ``--calibration``), or a bundle's (``PATH`` or pinned, ``PATH@sha256:HEX``)."""
    from pipeline import BUILTIN_DETECTORS, Detector, split_pin

    check_device(device)
    detector = detector or "mnist"
    try:
        if detector in BUILTIN_DETECTORS:
            return Detector.from_pretrained(detector, weights=weights, calibration=calibration, device=device)
        if calibration is not None:
            fail("--calibration goes with a built-in detector; a bundle carries its own")
        path, digest = split_pin(detector)
        return Detector.load(path, weights=weights, device=device, trust_code=trust_code, digest=digest)
    except (FileNotFoundError, ValueError, PermissionError) as exc:
        fail(str(exc))


@app.command()
def detect(
    paths: list[Path] = typer.Argument(..., help="PNG/JPEG files, or folders searched recursively"),
    detector: str | None = typer.Option(None, help=DETECTOR_HELP + " (default: mnist)"),
    weights: Path | None = typer.Option(None, help="a built-in model's weights (state dict)"),
    calibration: Path | None = typer.Option(None, help="a built-in model's calibration JSON (default: the shipped)"),
    method: str | None = typer.Option(None, help="explanation method (default: the calibration's)"),
    rule: str | None = typer.Option(None, help="calibrated (default) | sign (the paper's rule, by name only)"),
    fpr: float | None = typer.Option(
        None, help="the calibration's operating point to decide at, as a target false-positive rate, e.g. 0.01 "
        "(default: the calibration's own, 0.05 for the shipped detectors)"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout, one verdict per image"),
    as_csv: bool = typer.Option(False, "--csv", help="CSV on stdout, one verdict per image"),
    out: Path | None = typer.Option(None, help="write the verdicts to this file: .jsonl or .csv"),
    batch: int | None = typer.Option(
        None, min=1, help="images per detection call (default 64 digits, 8 photos: on a CPU larger photo batches "
        "only cost memory)"),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    trust_code: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    """One verdict per image: a table, JSON lines or CSV. Exit status 1 when some image could not be judged."""
    from pipeline import image_files, read_image_file
    from worker.detect import detect_requests
    from worker.verdicts import VerdictWriter

    det = open_detector(detector, weights, calibration, device, trust_code)
    if method:
        from dataclasses import replace

        from pipeline import Detector

        if det.calibration and det.calibration.method != method and rule != "sign":
            fail(f"the calibration was made for method {det.calibration.method!r}; use --rule sign or recalibrate")
        try:
            det = Detector(det.model, replace(det.config, method=method), det.calibration)
        except ValueError as exc:
            fail(str(exc))
    if rule is not None and rule not in RULES:
        fail(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    if rule != "sign" and det.calibration is None:
        fail(f"{det.model.name} has no calibration: calibrate it (explainer calibrate --model {det.model.name} "
             "--images-dir CLEAN --out BUNDLE) or ask for the paper's sign rule by name (--rule sign)")
    if fpr is not None:
        if rule == "sign":
            fail("--fpr picks a threshold of the calibrated rule; the sign rule has none")
        try:
            det.use_operating_point(fpr)
        except ValueError as exc:
            fail(str(exc))
    if as_json + as_csv + (out is not None) > 1:
        fail("give one of --json, --csv and --out")
    try:
        files = image_files(paths)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if not files:
        fail("no PNG/JPEG images in the paths given")
    fmt = "jsonl" if as_json else "csv" if as_csv else None
    if out is not None:
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(out.suffix.lower())
        if fmt is None:
            fail(f"--out {out}: give a .jsonl or .csv file")
    name, failed = det.model.name, 0
    batch = batch or (64 if det.model.resize_to is None and det.model.size <= 64 else 8)
    status_console = Console(stderr=True)
    with VerdictWriter(fmt, out, det.config.signals) as writer, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=status_console, disable=len(files) <= batch,
    ) as bar:
        task = bar.add_task("detecting", total=len(files))
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            reqs, verdicts = [], {}
            for path in chunk:
                try:
                    reqs.append(wire.Request(id=str(path), image=read_image_file(path), model=name))
                except InputError as exc:
                    verdicts[str(path)] = {"id": str(path), "model": name, "error": str(exc)}
            for v in detect_requests({name: _RuleDetector(det, rule)}, reqs):
                verdicts[v["id"]] = v
            for path in chunk:
                v = verdicts[str(path)]
                failed += bool(v.get("error"))
                writer.write(str(path), v)
            bar.update(task, advance=len(chunk))
    if fmt is None:
        console.print(writer.table())
    if failed:
        status_console.print(f"[yellow]{failed} of {len(files)} images could not be judged[/yellow]")
    raise typer.Exit(1 if failed else 0)


class _RuleDetector:
    """A detector whose ``detect`` uses the rule given on the command line (detect_requests passes none)."""

    def __init__(self, det, rule: str | None) -> None:
        self.det, self.rule = det, rule
        self.model, self.config, self.check = det.model, det.config, det.check

    def detect(self, images, return_maps: bool = False):
        return self.det.detect(images, rule=self.rule, return_maps=return_maps)


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"--{what}: comma-separated numbers, got {text!r}")


def _own_model(model: str, weights: Path | None, model_kwargs: str | None, input_size: int | None,
               channels: int | None, mean: str | None, std: str | None, resize_to: int | None,
               explain_layer: str | None, name: str, device: str | None):
    """The user's network (module:callable or a model file) as a target model."""
    from pipeline import load_network, parse_model_ref, wrap_network

    if input_size is None or channels is None:
        fail(f"--model {model}: give the input it takes, --input-size PIXELS and --channels 1|3")
    if (mean is None) != (std is None):
        fail("give --mean and --std together (the normalisation inside your model's input)")
    kwargs = {}
    if model_kwargs:
        try:
            kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as exc:
            fail(f"--model-kwargs is not JSON: {exc}")
        if not isinstance(kwargs, dict):
            fail("--model-kwargs must be a JSON object of keyword arguments")
    source = parse_model_ref(model, weights, kwargs)
    if kwargs and source.kind != "factory":
        fail(f"--model-kwargs: {model} is a {source.kind} model file, built already; the arguments apply to "
             "module:callable")
    normalize = None if mean is None else (_floats(mean, "mean"), _floats(std, "std"))
    target = wrap_network(load_network(source), name=name, input_size=input_size, channels=channels,
                          normalize=normalize, explain_layer=explain_layer, resize_to=resize_to, source=source)
    if device:
        target.to(device)
    return target


@app.command()
def calibrate(
    model: str = typer.Option("mnist", help=MODEL_HELP),
    weights: Path | None = typer.Option(None, help="state dict of a built-in model or of module:callable"),
    model_kwargs: str | None = typer.Option(None, help="JSON keyword arguments for module:callable"),
    input_size: int | None = typer.Option(None, help="your model's square input side in pixels"),
    channels: int | None = typer.Option(None, help="your model's input channels: 1 (greyscale) or 3 (RGB)"),
    mean: str | None = typer.Option(None, help="per-channel mean your model normalises by, e.g. 0.485,0.456,0.406"),
    std: str | None = typer.Option(None, help="per-channel std your model normalises by, e.g. 0.229,0.224,0.225"),
    resize_to: int | None = typer.Option(
        None, help="resize photos to this short side and centre-crop the input size (default: images come at it)"),
    explain_layer: str | None = typer.Option(None, help="Grad-CAM's layer, e.g. layer4 (default: the last Conv2d)"),
    preset_name: str | None = typer.Option(None, "--preset", help="digits | photos (default: by the model)"),
    name: str | None = typer.Option(None, help="the name requests pick the detector by (default: the --out folder's)"),
    out: Path | None = typer.Option(None, help="the detector bundle to write (a folder; required unless --check); "
                                    "a .json path writes the calibration alone, for a built-in model"),
    target_fpr: float = typer.Option(0.05, help="the default operating point (target false-positive rate)"),
    fprs: str | None = typer.Option(
        None, help="more operating points, comma-separated, e.g. 0.01,0.001: detect --fpr and serve --fpr pick one "
        "(default: 0.01,0.001, each kept when the clean images suffice for it)"),
    method: str | None = typer.Option(None, help="explanation method (see pipeline.explain); default: the preset's"),
    signals: str | None = typer.Option(None, help="comma-separated signals the score combines (default: the "
                                       "preset's; see pipeline.signals)"),
    steps: int = typer.Option(4, help="integration steps (IG, SmoothGrad-IG; ignored by saliency)"),
    samples: int = typer.Option(8, help="samples for SHAP / SmoothGrad"),
    entropy: str = typer.Option("spatial", help="spatial | histogram | paper"),
    nlm_h: float | None = typer.Option(None, help="NLM filter strength (default: the preset's, 50 for digits)"),
    nlm_template: int | None = typer.Option(None, help="NLM patch size (odd; default: the preset's)"),
    nlm_search: int | None = typer.Option(None, help="NLM search window (odd; default: the preset's)"),
    signal_param: list[str] | None = typer.Option(
        None, help="a signal's parameter, SIGNAL.FIELD=VALUE, e.g. median_shift.size=3 (repeatable; default: the "
        "preset's; each signal's fields: pipeline.signals)"),
    confidence: float | None = typer.Option(
        None, help="set the threshold so that the target FPR holds with this confidence (e.g. 0.95), not only "
        "in expectation"),
    combine: str | None = typer.Option(
        None, help="how the signals' tail scores make one score: max | sum (default: the preset's, sum for digits, "
        "max for photos)"),
    folds: int | None = typer.Option(
        None, help="cross-fit the CDFs and the threshold over K folds (0: two halves; default: the preset's, "
        "two halves for digits, 5 folds for photos)"),
    n: int | None = typer.Option(None, help="use only the first N calibration images"),
    images_dir: Path | None = typer.Option(
        None, help="folder of clean PNG/JPEG images, searched recursively (required for your own model; default "
        "for a built-in one: even MNIST test digits / even-position ImageNet sample photos)"),
    split: str = typer.Option("all", help="which of --images-dir's sorted images: all | even | odd"),
    per_folder: bool = typer.Option(
        False, "--per-folder", help="each subfolder of --images-dir holds one camera's (or source's) clean images: "
        "every operating point is then set to hold on each camera with enough images for it, not only on the mix"),
    batch: int | None = typer.Option(None, min=1, help="images per detection call (default 128 digits, 8 photos)"),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    check: str | None = typer.Option(
        None, help="check a detector (built-in or bundle) instead of calibrating one: whether each operating point "
        "still holds on --images-dir's clean images (realised FPR and 95% interval); exit 1 when one does not"),
    trust_code: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    """Calibrate a detector at a target false-positive rate on clean images only, and save it as a bundle; or,
    with --check, say whether a detector's thresholds still hold on a folder of clean images.

    A built-in model starts from its preset (pipeline.presets: digits for mnist, photos for the ImageNet
    models); your own model from --preset (digits for one channel, photos for three). The options replace parts
    of it. The bundle (docs/bundle.md) is what explainer detect --detector, explainer serve --detector and
    Detector.load read. Recalibrating on your own cameras' clean photos is the same command with --images-dir."""
    if check is not None:
        _check_operating_points(check, images_dir, split, n, batch, device, trust_code)
        return
    if out is None:
        fail("--out: the detector bundle (folder) or calibration (.json) to write")
    from dataclasses import replace

    from pipeline import (
        CALIBRATION_FOLDS,
        MODEL_NAMES,
        MODEL_PRESETS,
        Detector,
        ExplainParams,
        InputError,
        check_detector_name,
        default_config,
        default_folds,
        load_model,
        preset_scoring,
    )

    check_device(device)
    builtin = model in MODEL_NAMES
    as_file = out.suffix.lower() == ".json"
    if as_file and not builtin:
        fail("--out: your own model's calibration is saved as a bundle (a folder), which also records how to load "
             "the model; give a folder")
    try:
        name = check_detector_name(name or (model if builtin and as_file else out.name))
    except ValueError as exc:
        fail(f"{exc}; give --name")
    if not builtin and images_dir is None:
        fail("--images-dir: your own model calibrates on your clean images (a folder of PNG/JPEG)")
    try:
        if builtin:
            given = [f"--{k.replace('_', '-')}" for k, v in (("input_size", input_size), ("channels", channels),
                     ("mean", mean), ("std", std), ("resize_to", resize_to), ("explain_layer", explain_layer),
                     ("model_kwargs", model_kwargs)) if v is not None]
            if given:
                fail(f"{', '.join(given)}: a built-in model knows its input; these apply to your own model")
            target = load_model(model, weights)
            target.name = name
            if device:
                target.to(device)
            base, base_folds = (preset_config(preset_name) if preset_name else default_config(model),
                                CALIBRATION_FOLDS[preset_name] if preset_name else default_folds(model))
            used = preset_name or MODEL_PRESETS[model]
        else:
            target = _own_model(model, weights, model_kwargs, input_size, channels, mean, std, resize_to,
                                explain_layer, name, device)
            used = preset_name or ("digits" if channels == 1 else "photos")
            base, base_folds = preset_config(used), CALIBRATION_FOLDS.get(used)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    nlm = base.nlm
    if nlm_h is not None:
        nlm = replace(nlm, h=nlm_h, h_color=nlm_h)
    nlm = replace(nlm, template=nlm_template or nlm.template, search=nlm_search or nlm.search)
    chosen = dict(base.signals) if signals is None else {s.strip(): base.signals.get(s.strip())
                                                         for s in signals.split(",") if s.strip()}
    for given in signal_param or []:
        name, _, value = given.partition("=")
        sig, _, knob = name.partition(".")
        if not (sig and knob and value) or sig not in chosen:
            fail(f"--signal-param {given}: expected SIGNAL.FIELD=VALUE for one of the signals scored "
                 f"({', '.join(chosen)})")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        chosen[sig] = {**(dict(vars(chosen[sig])) if is_dataclass(chosen[sig]) else dict(chosen[sig] or {})),
                       knob: parsed}
    try:
        det = Detector(target, replace(base, method=method or base.method, explain=ExplainParams(steps=steps,
                       samples=samples), entropy=entropy, nlm=nlm, signals=chosen))
        images, desc, groups = _calibration_images(model if builtin else None, images_dir, split, n, per_folder)
    except (FileNotFoundError, ValueError, InputError) as exc:
        fail(str(exc))
    if folds is None:
        folds = None if confidence is not None else base_folds
    scoring = preset_scoring(used)
    points = _floats(fprs, "fprs")
    if points is not None and not all(0 < f < 1 for f in points):
        fail(f"--fprs: target false-positive rates lie in (0, 1), got {fprs}")
    digits_like = det.model.resize_to is None and det.model.size <= 64
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(images))
        try:
            cal = det.calibrate(images, target_fpr, images=desc, batch_size=batch or (128 if digits_like else 8),
                                progress=lambda k: bar.update(task, completed=k), confidence=confidence,
                                folds=folds or None, fprs=points or DEFAULT_FPRS, drop_unsupported=points is None,
                                groups=groups,
                                **{**scoring, **({"combine": combine} if combine else {})})
        except (ValueError, InputError) as exc:
            fail(str(exc))
    if as_file:
        cal.save(out)
    else:
        det.save(out)
    console.print(
        "operating points (target FPR: threshold, held-out FPR): "
        + "; ".join(f"{fpr_label(p.target_fpr)}: {p.threshold:.4f}, {p.threshold_fpr:.2%}" for p in cal.points)
        + (f" on {cal.n_reference} images cross-fitted over {cal.folds} folds" if cal.folds else
           f" on {cal.n_reference}+{cal.n_threshold} images"))
    if dropped := [f for f in (points or DEFAULT_FPRS) if f not in cal.fprs]:
        console.print(f"[yellow]left out FPR {', '.join(map(fpr_label, dropped))}: {cal.n_threshold} held-out "
                      f"clean scores are too few for a threshold there (it needs about 1/FPR); calibrate on more "
                      "clean images[/yellow]")
    console.print(f"default {fpr_label(target_fpr)} -> {out}" + ("" if as_file else f"  (detector {name!r})"))
    if not as_file:
        from pipeline import bundle_digest

        console.print(f"pin it: --detector {out}@{bundle_digest(out)}")


@app.command()
def digest(bundle: Path = typer.Argument(..., help="a detector bundle folder")) -> None:
    """Print a bundle's digest (sha256: of its manifest, which records every file's): serve it as
    BUNDLE@sha256:HEX and any other bundle at that path is refused."""
    from pipeline import bundle_digest

    try:
        print(bundle_digest(bundle))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))


def _check_operating_points(detector: str, images_dir: Path | None, split: str, n: int | None,
                            batch: int | None, device: str | None, trust_code: bool) -> None:
    """``calibrate --check``: each operating point's realised FPR on the clean images, with its interval."""
    from rich.table import Table

    from pipeline import fpr_label as label

    if images_dir is None:
        fail("--check needs --images-dir: clean images from where the detector runs (its cameras, its site)")
    det = open_detector(detector, None, None, device, trust_code)
    try:
        images, desc, _ = _calibration_images(None, images_dir, split, n)
        with progress_bar() as bar:
            task = bar.add_task("checking", total=len(images))
            checks = det.check_operating_points(images, batch or 64,
                                                progress=lambda k: bar.update(task, completed=k))
    except (FileNotFoundError, ValueError, InputError) as exc:
        fail(str(exc))
    table = Table("target FPR", "threshold", "flagged", "realised FPR", "95% interval", "holds",
                  title=f"{det.model.name} on {desc}")
    for c in checks:
        table.add_row(label(c.target_fpr), f"{c.threshold:.4f}", f"{c.flagged} / {c.n}", f"{c.fpr:.2%}",
                      f"{c.ci95[0]:.2%}–{c.ci95[1]:.2%}",
                      "[red]no: recalibrate[/red]" if not c.holds else "yes, conservative" if c.conservative
                      else "yes")
    console.print(table)
    if not all(c.holds for c in checks):
        raise typer.Exit(1)


def preset_config(name: str):
    from pipeline import preset

    try:
        return preset(name)
    except ValueError as exc:
        fail(str(exc))


def _calibration_images(model: str | None, images_dir: Path | None, split: str, n: int | None,
                        per_folder: bool = False):
    """(images, description, groups): the folder's clean images (stacked when all of one size), or a built-in
    model's reference calibration half; with ``per_folder``, each image's first-level subfolder (its camera)."""
    if images_dir is None:
        reference = load_plugins().reference_images
        if model is None or reference is None:
            raise FileNotFoundError("give --images-dir CLEAN: a folder of clean images of what the model will see")
        if per_folder:
            raise FileNotFoundError("--per-folder reads the subfolders of --images-dir: give --images-dir")
        return (*reference(model, n), None)
    from pipeline import image_files, read_image_file

    if not Path(images_dir).is_dir():
        raise FileNotFoundError(f"--images-dir {images_dir}: not a folder")
    files = image_files([images_dir], split)
    files = files[:n] if n else files
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG images in {images_dir}" + (f" ({split} positions)" if split != "all"
                                                                         else ""))
    images = [read_image_file(p) for p in files]
    stacked = np.stack(images) if len({im.shape for im in images}) == 1 else images
    which = "" if split == "all" else f" at {split} positions"
    groups = None
    if per_folder:
        groups = np.array([p.relative_to(images_dir).parts[0] if len(p.relative_to(images_dir).parts) > 1 else "."
                           for p in files])
        which += f", {len(set(groups.tolist()))} cameras (subfolders)"
    return stacked, f"{len(files)} images from {images_dir}{which}", groups


PASSWORD_FILE_HELP = ("a file holding the Redis password (default: $EXPLAINER_REDIS_PASSWORD); keeps it off the "
                      "command line and out of the URL")
REDIS_URL_HELP = ("Redis URL, or redis+cluster://HOST:PORT for any node of a Redis Cluster (default: "
                  "$EXPLAINER_REDIS_URL, else the server `explainer serve` started from this folder, else "
                  "redis://127.0.0.1:6379/0)")
SHARDS_HELP = StreamSettings.knobs()["shards"][1]


@app.command()
def serve(
    redis_url: str | None = typer.Option(None, help="Redis to consume (default: start a local redis-server)"),
    redis_password_file: Path | None = typer.Option(None, help=PASSWORD_FILE_HELP),
    config: Path = typer.Option(DEFAULT_CONFIG, help="Ray Serve config file"),
    http_port: int = typer.Option(8000),
    http_host: str = typer.Option(
        "127.0.0.1", help="address POST /detect listens on; any other than loopback needs a bearer token"),
    http_token_file: Path | None = typer.Option(
        None, help="a file holding the bearer token POST /detect requires (default: $EXPLAINER_HTTP_TOKEN)"),
    data_dir: Path = typer.Option(Path(".explainer"), help="where the local redis-server keeps its AOF"),
    metrics_port: int | None = typer.Option(
        None, help="port of Ray's Prometheus metrics endpoint when serve starts Ray (default: a free one, printed)"),
    detector: list[str] | None = typer.Option(
        None, help=DETECTOR_HELP + ", to serve instead of the config's (repeatable: a request's model field picks "
        "one by name)"),
    trust_code: bool = typer.Option(False, help=TRUST_HELP),
    fpr: float | None = typer.Option(
        None, help="the operating point every served detector decides at, as a target false-positive rate its "
        "calibration holds, e.g. 0.01 (default: each calibration's own)"),
    alert_window: str | None = typer.Option(
        None, help="K/N: one alert when K of the last N images of one source are flagged, e.g. 3/10 (default: an "
        "alert per flagged image)"),
    shards: int | None = typer.Option(None, min=1, max=MAX_SHARDS, help=SHARDS_HELP + " (default: the config's)"),
    ref_allow: list[str] | None = typer.Option(
        None, help="a URL prefix images sent by reference may be fetched from, e.g. https://photos.example.com/cams/ "
        "(repeatable; default: the config's, none)"),
) -> None:
    """Run the streaming worker until Ctrl-C / SIGTERM (local Redis and Ray when none is given)."""
    import signal
    import threading

    from pipeline import BUILTIN_DETECTORS, split_pin
    from worker.embedded import embedded_stack
    from worker.serve_app import check_http_exposure, http_token
    from worker.streams import redact_url

    overrides: dict = {}
    try:  # the replicas check again where Serve's proxy listens; this says so before anything starts
        check_http_exposure(http_host, http_token(str(http_token_file) if http_token_file else None))
    except (OSError, ValueError) as exc:
        fail(f"--http-host {http_host}: {exc}")
    if fpr is not None:
        if not 0 < fpr < 1:
            fail(f"--fpr: a target false-positive rate lies in (0, 1), got {fpr}")
        overrides["fpr"] = fpr
    if shards is not None:
        overrides["shards"] = shards
    if ref_allow:
        overrides["ref_allow"] = list(ref_allow)
    if alert_window is not None:
        k, _, n = alert_window.partition("/")
        try:
            settings = StreamSettings(alert_k=int(k), alert_n=int(n))
        except ValueError as exc:
            fail(f"--alert-window {alert_window}: K/N, 1 ≤ K ≤ N ({exc})")
        overrides.update(alert_k=settings.alert_k, alert_n=settings.alert_n)
    if http_token_file is not None:
        overrides["http_token_file"] = str(http_token_file.resolve())
    if redis_password_file is not None:
        if redis_url is None:
            fail("--redis-password-file goes with --redis-url (the local Redis serve starts needs none)")
        overrides["redis_password_file"] = str(redis_password_file.resolve())  # the replicas' working dir differs
    if detector:
        given = []
        for d in detector:
            try:
                path, pin = split_pin(d)
            except ValueError as exc:
                fail(f"--detector {d}: {exc}")
            if d not in BUILTIN_DETECTORS and not (Path(path) / "detector.json").is_file():
                fail(f"--detector {d}: neither a built-in detector ({', '.join(BUILTIN_DETECTORS)}) nor a detector "
                     "bundle (a folder with detector.json; explainer calibrate --out makes one)")
            # absolute: the replicas do not share this process's working directory
            given.append(d if d in BUILTIN_DETECTORS else str(Path(path).resolve()) + (f"@{pin}" if pin else ""))
        overrides.update(detector=given, trust_code=trust_code)
    stop = threading.Event()
    with console.status("starting…"), embedded_stack(redis_url, config, data_dir, http_port,
                                                          overrides=overrides or None, http_host=http_host,
                                                          metrics_port=metrics_port) as stack:
        # installed after Ray starts: ray.init replaces SIGTERM's handler with one that aborts the process
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        console.print(f"serving: redis {redact_url(stack.redis_url)}  http {stack.http_url}  "
                      f"metrics {stack.metrics_url or 'Ray cluster'}"
                      "  (Ctrl-C to stop)")
        while not stop.wait(0.5):
            pass
        console.print("stopping: finishing batches in flight…")
    console.print("stopped cleanly")


@app.command()
def feed(
    redis_url: str | None = typer.Option(None, help=REDIS_URL_HELP),
    redis_password_file: Path | None = typer.Option(None, help=PASSWORD_FILE_HELP),
    n: int = typer.Option(100, help="how many images"),
    source: str = typer.Option("mnist", help="mnist (held-out test digits) | adversarial (shipped) | a folder"),
    attack: str | None = typer.Option(None, help="make adversarials on the fly with this attack (pgd, bim, ...)"),
    encoding: str = typer.Option("raw", help="raw | png | jpeg"),
    camera: str | None = typer.Option(None, help="the source id (camera or feed) every image carries: the "
                                      "request's source field, which alert windows count by"),
    detector: str = typer.Option("mnist", help="the name of the served detector that judges them (each request's "
                                 "model field)"),
    shards: int | None = typer.Option(None, min=1, max=MAX_SHARDS, help="the image streams the worker reads (its "
                                      "shards setting; default: the count the worker noted in Redis, else 1): each "
                                      "image goes to the one its camera, else its id, picks (worker.wire.shard_of)"),
) -> None:
    """Push images into the image streams."""
    from pipeline import load_adversarial_digits, load_sample_digits
    from worker.feed import push_images
    from worker.streams import StreamNames, connect_with_password, is_cluster, served_shards

    if source == "mnist":
        digits = load_sample_digits().parity("odd").head(n)
        images, ids = digits.images, [f"mnist-{i}" for i in digits.indices]
        if attack:
            attacks = load_plugins().attacks
            if attack not in attacks:
                fail(f"unknown attack {attack!r}; choose one of {', '.join(attacks) or 'none (no plugin gives any)'}")
            images = attacks[attack](digits.images, digits.labels)
            ids = [f"{attack}-{i}" for i in digits.indices]
    elif source == "adversarial":
        adv = load_adversarial_digits().head(n)
        images, ids = adv.images, [f"adv-{a}-{i}" for a, i in zip(adv.attacks, adv.indices, strict=True)]
    else:
        from pipeline import image_files, read_image_file

        try:
            files = image_files([source])[:n]
        except FileNotFoundError as exc:
            fail(f"--source: {exc}")
        images, ids = [read_image_file(p) for p in files], [p.name for p in files]
    client = connect_with_password(resolve_redis_url(redis_url), redis_password_file)
    names = StreamNames()
    shards = served_shards(client, names, shards)
    stream_ids = push_images(client, names, images, ids=ids, encoding=encoding, model=detector, source=camera,
                             shards=shards)
    streams = [n.images for n in names.shards(shards, is_cluster(client))]
    console.print(f"pushed {len(stream_ids)} images for {detector} to {', '.join(streams)}")


@app.command()
def watch(
    redis_url: str | None = typer.Option(None, help=REDIS_URL_HELP),
    redis_password_file: Path | None = typer.Option(None, help=PASSWORD_FILE_HELP),
    all_verdicts: bool = typer.Option(
        False, "--all", help="follow every verdict (the verdict streams), not only alerts"
    ),
    shards: int | None = typer.Option(None, min=1, max=MAX_SHARDS, help="the worker's shards setting (default: the "
                                      "count the worker noted in Redis, else 1): --all follows every shard's verdict "
                                      "stream"),
) -> None:
    """Print verdicts live: adversarial alerts from the pub/sub channel, or every verdict from the stream."""
    from worker.collect import VerdictReader
    from worker.streams import StreamNames, connect_with_password, served_shards
    from worker.verdicts import watch_line

    client, names = connect_with_password(resolve_redis_url(redis_url), redis_password_file), StreamNames()

    def show(v: dict) -> None:
        console.print(watch_line(v))

    try:
        if all_verdicts:
            reader = VerdictReader(client, names, served_shards(client, names, shards))
            while True:
                for _sid, data in reader.read(block_ms=1000, count=100):
                    show(wire.decode_verdict(data))
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(names.alerts)
        console.print(f"watching {names.alerts} (Ctrl-C to stop)")
        for message in pubsub.listen():
            show(wire.decode_alert(message["data"]))
    except KeyboardInterrupt:
        pass


_with_plugins: list[typer.Typer] = []


def full_app() -> typer.Typer:
    """The product's commands and every installed plugin's (:mod:`worker.plugins`: the harness's evaluate, bench
    and demo), added once per process."""
    if not _with_plugins:
        for add in load_plugins().commands:
            add(app)
        _with_plugins.append(app)
    return app


def main() -> None:
    full_app()()


if __name__ == "__main__":
    main()
