"""Which patched validation photos does the shipped photo score miss, and would summing the tail scores help?

Even photos only, from scripts/search_imagenet.py's split and cache (calibration: the 125 even photos at even
positions, which also train the patch; validation: the other 125 even photos, clean and attacked). The shipped
score (max over the tail scores of pipeline.configs.IMAGENET_CONFIG's signals: entropy_original, occlusion_shift
and prediction_shift until stop 12, activation_norm added in stop 13) is cross-fitted over 5 folds on the
calibration photos, as the evaluation fits it. For each missed patched photo the report lists its
prediction, confidence and per-signal tail scores. It then compares the max with the sum of the tail scores
(Fisher's way of pooling p-values), by validation ROC-AUC and by detection at the 95th percentile of the
validation clean photos' own scores (in-sample, the same for both: a comparison, not an evaluation), and adds the
lower tail of the confidence (the misses' is low) as one more signal.

Run: python scripts/imagenet_validation_misses.py   (writes reports/imagenet_validation_misses.md)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_imagenet import _photo_sets, calibrated_cells, config_signals, photo_calibration  # noqa: E402

from pipeline.configs import IMAGENET_CONFIG  # noqa: E402
from pipeline.data import PROJECT_ROOT  # noqa: E402
from pipeline.detector import Detector  # noqa: E402
from pipeline.evaluate_imagenet import TOASTER  # noqa: E402
from pipeline.evaluation import roc_auc  # noqa: E402
from pipeline.models import load_model  # noqa: E402

PATCH_STEPS = 200


def main() -> None:
    torch.manual_seed(0)
    model = load_model("mobilenet_v2")
    photos = _photo_sets(model, PATCH_STEPS, True)
    sig = config_signals(Detector(model, IMAGENET_CONFIG), photos, PATCH_STEPS, True)
    use = IMAGENET_CONFIG.signals
    cal = photo_calibration(sig["calibration"], use)
    patch, clean = sig["patch"], sig["clean"]
    tails = {n: ref.tail_score(np.asarray(patch[n])) for n, ref in cal.signals.items()}
    missed = np.flatnonzero(cal.score(patch) <= cal.threshold)
    lines = ["# ImageNet validation: the patch's misses, and max against sum of tail scores", "",
             __doc__.strip(), "",
             f"Threshold {cal.threshold:.3f}; validation clean FPR {np.mean(cal.score(clean) > cal.threshold):.1%}; "
             f"{len(missed)} of {len(patch[use[0]])} patched photos missed "
             f"(the clean photos' median confidence {np.median(clean['confidence']):.2f}).", "",
             "| missed photo | predicted class | confidence | " + " | ".join(f"{n} tail score" for n in use) + " |",
             "|---|---|---|" + "---|" * len(use)]
    for i in missed:
        target = " (the target, toaster)" if patch["predicted_class"][i] == TOASTER else ""
        lines.append(f"| {i} | {patch['predicted_class'][i]}{target} | {patch['confidence'][i]:.2f} | "
                     + " | ".join(f"{tails[n][i]:.2f}" for n in use) + " |")
    attacks = [k for k in sig if k not in ("calibration", "clean")]
    lines += ["", "| pooling | " + " | ".join(f"{a}: ROC-AUC / detection at the clean 95th percentile" for a in attacks)
              + " |", "|---|" + "---|" * len(attacks)]
    for pooling in ("max", "sum"):
        def score(s: dict, pooling: str = pooling) -> np.ndarray:
            parts = np.array([ref.tail_score(np.asarray(s[n])) for n, ref in cal.signals.items()])
            return parts.max(0) if pooling == "max" else parts.sum(0)

        cut = np.quantile(score(clean), 0.95)
        cells = [f"{roc_auc(score(clean), score(sig[a])):.3f} / {np.mean(score(sig[a]) > cut):.1%}" for a in attacks]
        lines.append(f"| {pooling} | " + " | ".join(cells) + " |")
    # most misses are classified with low confidence: does the confidence's lower tail, as one more signal, help?
    for k in sig:
        sig[k]["negated_confidence"] = -sig[k]["confidence"]
    with_conf = photo_calibration(sig["calibration"], (*use, "negated_confidence"), {"negated_confidence": "upper"})
    lines += ["", "Calibrated at 5% (cross-fitted on the calibration photos): validation FPR, detection % / ROC-AUC:",
              "", "| signals | validation FPR | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    for c in (cal, with_conf):
        lines.append(f"| {', '.join(c.signals)} | {calibrated_cells(c, sig, attacks)} |")
    out = PROJECT_ROOT / "reports" / "imagenet_validation_misses.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
