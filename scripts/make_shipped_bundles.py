"""Write the shipped detector bundles, pipeline/assets/detectors/{mnist,mobilenet_v2}, from the calibrations the
reference runs made:

- mnist: ``explainer calibrate --model mnist --confidence 0.95 --out mnist_calibration.json`` (the 5,000 even MNIST
  test digits and the 1,262 training digits the model was not trained on; operating points 5%, 1% and 0.1%, each
  holding with 95% confidence; docs/method.md), kept in the bundle as calibration.json;
- mobilenet_v2: the calibration ``explainer evaluate --model mobilenet_v2`` fitted on 1,050 photos of three
  sources no ImageNet model trained on, each operating point holding on every source large enough for it
  (reports/imagenet/calibration.json).

Each bundle names its built-in model and carries no weights: MobileNetV2's come from the shared file, torch's hub
cache or ``weights=``. The third shipped bundle, mnist-robust (the digits CNN adversarially trained, its weights
inside), is written by ``explainer calibrate`` itself: scripts/train_mnist_robust.py gives the command.

Run: python scripts/make_shipped_bundles.py [--mnist CALIBRATION] [--mobilenet-v2 CALIBRATION]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from pipeline import Detector
from pipeline.detector import SHIPPED_BUNDLES

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist", type=Path, default=SHIPPED_BUNDLES / "mnist" / "calibration.json")
    ap.add_argument("--mobilenet-v2", type=Path, default=ROOT / "reports" / "imagenet" / "calibration.json")
    args = ap.parse_args()
    for name, calibration in (("mnist", args.mnist), ("mobilenet_v2", args.mobilenet_v2)):
        with tempfile.TemporaryDirectory() as tmp:  # the source may sit inside the bundle being replaced
            kept = Path(tmp) / "calibration.json"
            shutil.copy(calibration, kept)
            folder = Detector.from_pretrained(name, calibration=kept).save(SHIPPED_BUNDLES / name)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
