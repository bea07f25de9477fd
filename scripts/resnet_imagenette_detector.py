"""The own-model path on a ResNet-18 a user trained: calibrate, evaluate on photos, detect, and the stream.

Reads the network ``scripts/train_resnet_imagenette.py`` wrote (.explainer/models/resnet18_imagenette.pt) and runs,
as a user would, the ``explainer`` commands on it, with photos it never trained on: the quarter of Imagenette's
ImageNet-training photos the training kept out (positions 3 mod 4) and Imagenette's ImageNet-validation photos.
The held-out quarter and the validation photos at even positions calibrate (points at 5%, 1% and 0.1%); the
validation photos at odd positions are evaluated (``explainer evaluate --detector --photos``), detected through
``explainer detect``, and sent through the stream (an embedded Redis + Ray Serve app serving the bundle), whose
verdicts must be the in-process ones. Writes reports/imagenette_resnet18/ (the evaluation's report.md, and
own_model.md with the commands, the model's accuracy, and the detect and stream checks).
Usage: ``python scripts/resnet_imagenette_detector.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.datasets import load_labelled_photos  # noqa: E402
from scripts.train_resnet_imagenette import CLASSES, CROP, MEAN, RESIZE, STD  # noqa: E402

NAME = "resnet18_imagenette"
WORK = ROOT / ".explainer" / NAME


def explainer(*args: str) -> tuple[str, float]:
    """Run one ``explainer`` command as a user would; its output and seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"})
    if done.returncode:
        raise SystemExit(f"explainer {shlex.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=ROOT / ".explainer" / "models" / f"{NAME}.pt")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "imagenette_resnet18")
    ap.add_argument("--stream", type=int, default=48, help="evaluation photos sent through the stream")
    args = ap.parse_args()
    if not args.weights.exists():
        raise SystemExit(f"{args.weights} not found: run python scripts/train_resnet_imagenette.py first")
    index = {c: i for i, c in enumerate(CLASSES)}
    train = load_labelled_photos("imagenette", "imagenet-train")
    val = load_labelled_photos("imagenette", "imagenet-val")
    calibration = [p for i, (p, _) in enumerate(train) if i % 4 == 3] + [p for p, _ in val[0::2]]
    evaluation = [(p, index[c]) for p, c in val[1::2]]
    cal_dir = WORK / "calibration"
    cal_dir.mkdir(parents=True, exist_ok=True)
    for old in cal_dir.iterdir():
        old.unlink()
    for i, path in enumerate(calibration):
        (cal_dir / f"{i:05d}{path.suffix}").symlink_to(path)
    photos_csv = WORK / "evaluation.csv"
    with open(photos_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([str(p), y] for p, y in evaluation)
    bundle = WORK / "bundle"
    model_args = ["--model", "torchvision.models:resnet18", "--model-kwargs", json.dumps({"num_classes": 10}),
                  "--weights", str(args.weights), "--input-size", str(CROP), "--channels", "3",
                  "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)), "--resize-to", str(RESIZE),
                  "--explain-layer", "layer4"]
    calibrate = ["calibrate", *model_args, "--images-dir", str(cal_dir), "--fprs", "0.05,0.01,0.001",
                 "--name", NAME, "--out", str(bundle)]
    cal_out, cal_s = explainer(*calibrate)
    print(cal_out, flush=True)
    evaluate = ["evaluate", "--detector", str(bundle), "--trust-code", "--photos", str(photos_csv),
                "--out", str(args.out)]
    eval_out, eval_s = explainer(*evaluate)
    print(eval_out, flush=True)

    from pipeline import Detector, read_image_file
    from worker.collect import collect_verdicts, last_id
    from worker.embedded import embedded_stack
    from worker.feed import push_images
    from worker.local_redis import free_port
    from worker.streams import StreamNames, connect

    det = Detector.load(bundle, trust_code=True)
    sent = [p for p, _ in evaluation[: args.stream]]
    detect_csv = WORK / "verdicts.csv"
    _, detect_s = explainer("detect", "--detector", str(bundle), "--trust-code", *map(str, sent[:16]),
                            "--out", str(detect_csv))
    with open(detect_csv, newline="") as fh:
        cli_flags = [row["is_adversarial"] == "True" for row in csv.DictReader(fh)]
    photos = [read_image_file(p) for p in sent]
    local = det.detect(det.prepare(photos))
    names = StreamNames()
    ids = [f"photo-{i}" for i in range(len(sent))]
    jpegs = [cv2.imdecode(cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_COLOR)[..., ::-1]
             for im in photos]
    jpeg_local = det.detect(det.prepare(jpegs))
    with embedded_stack(data_dir=WORK / "stack", http_port=free_port(),
                        overrides={"detector": [str(bundle)], "trust_code": True, "block_ms": 100}) as stack:
        client = connect(stack.redis_url)
        after = last_id(client, names.verdicts)
        start = time.perf_counter()
        push_images(client, names, photos, ids=ids, model=NAME, encoding="jpeg")
        got = collect_verdicts(client, names, ids, after, timeout_s=600)
        stream_s = time.perf_counter() - start
    stream_flags = [bool(got[i].get("is_adversarial")) for i in ids]
    stream_scores = np.array([got[i].get("score", np.nan) for i in ids], dtype=float)
    summary = {
        "calibrate": {"command": "explainer " + shlex.join(calibrate), "seconds": cal_s,
                      "photos": len(calibration), "output": cal_out.strip().splitlines()[-3:]},
        "evaluate": {"command": "explainer " + shlex.join(evaluate), "seconds": eval_s},
        "detect": {"photos": 16, "seconds": detect_s,
                   "agrees_with_in_process": cli_flags == local.is_adversarial[:16].tolist()},
        "stream": {"photos": len(ids), "verdicts": len(got), "seconds": stream_s, "encoding": "jpeg 95",
                   "errors": sum("error" in v for v in got.values()),
                   "flags_agree_with_in_process_on_the_same_jpegs": stream_flags == jpeg_local.is_adversarial.tolist(),
                   "max_score_difference": float(np.nanmax(np.abs(stream_scores - jpeg_local.score)))},
    }
    (args.out / "own_model.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
