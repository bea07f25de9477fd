"""Can the 2×2 median fold into the denoised view, saving the median check's extra forward pass? (MNIST)

The shipped detector classifies each original three times: as is and NLM-denoised (the explanation's forward
and backward pass over 2N images) and once more 2×2-median-filtered (the median check, an inference-only
forward pass, about 20% more model work; issue 5's floor counts only the first two). This asks whether a
composite denoiser, NLM after or before the 2×2 median, can take the median check's place in the one denoised
copy, on the validation split of scripts/search_config.py (even digits only: every 10th is validation, the rest
calibrate; adversarials from the first 300 validation digits, 150 for CW-L0). Each score is calibrated at 5% FPR
on the calibration digits and reported as validation FPR and detection % / ROC-AUC per attack.

Run: python scripts/search_composite_denoiser.py   (writes reports/mnist_composite_denoiser_search.md)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_config import VALIDATION_ATTACKS as ATTACK_NAMES  # noqa: E402
from search_config import describe, signals, validation_split  # noqa: E402

from pipeline import Detector, DetectorConfig, load_model  # noqa: E402
from pipeline.baselines.feature_squeezing import median_filter  # noqa: E402
from pipeline.calibration import fit_calibration  # noqa: E402
from pipeline.data import PROJECT_ROOT  # noqa: E402
from pipeline.evaluation import roc_auc  # noqa: E402

ORDERS = {
    "nlm": "NLM, with the separate median check (shipped)",
    "median_nlm": "NLM of the 2×2-median-filtered digit, no median check",
    "nlm_median": "2×2 median of the NLM-denoised digit, no median check",
}
SCORES = (("prediction_shift", "map_shift"), ("prediction_shift", "map_shift", "median_shift"),
          ("entropy_original", "prediction_shift", "map_shift"))


class CompositeDenoiser(Detector):
    """The shipped detector with its denoised copy made by ``order`` (a key of ORDERS)."""

    def __init__(self, model, config: DetectorConfig, order: str) -> None:
        super().__init__(model, config)
        self.order = order

    def denoise(self, x: np.ndarray, workers: int | None = None) -> np.ndarray:
        if self.order == "median_nlm":  # the median's output rounded to uint8 levels, as NLM takes it
            filtered = np.round(median_filter(torch.from_numpy(x), 2).numpy() * 255) / 255
            return super().denoise(filtered.astype(np.float32), workers)
        if self.order == "nlm_median":
            return median_filter(torch.from_numpy(super().denoise(x, workers)), 2).numpy()
        return super().denoise(x, workers)


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = load_model("mnist")
    cal_images, sets = validation_split(model)
    lines = ["# Composite denoisers (even-indexed digits only)", "", __doc__.strip(), "", describe(sets), "",
             "| denoised copy | score | validation FPR | " + " | ".join(ATTACK_NAMES) + " |",
             "|---|---|---|" + "---|" * len(ATTACK_NAMES)]
    for order, label in ORDERS.items():
        check = 2 if order == "nlm" else 0
        det = CompositeDenoiser(model, DetectorConfig(median=check, signals=("prediction_shift", "map_shift")), order)
        cal = signals(det, cal_images)
        val = {k: signals(det, v) for k, v in sets.items()}
        for use in SCORES:
            if "median_shift" in use and not check:
                continue
            c = fit_calibration(cal, 0.05, model="mnist", method="saliency", entropy="spatial", images="", use=use)
            score = {k: c.score(v) for k, v in val.items()}
            cells = [f"{np.mean(score[k] > c.threshold):.1%} / {roc_auc(score['clean'], score[k]):.3f}"
                     for k in ATTACK_NAMES]
            lines.append(f"| {label} | {', '.join(use)} | {np.mean(score['clean'] > c.threshold):.1%} | "
                         + " | ".join(cells) + " |")
        print(f"done {order}", flush=True)
    lines += ["", f"Run time {(time.perf_counter() - start) / 60:.1f} min.", ""]
    out = PROJECT_ROOT / "reports" / "mnist_composite_denoiser_search.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
