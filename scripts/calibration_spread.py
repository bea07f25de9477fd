"""How far a photo calibration's false-positive rate strays on a small clean set, and whether cross-fitting the
threshold (``fit_calibration(folds=K)``) keeps it nearer the target: even-positioned ImageNet photos only.

The 250 even photos (the evaluation's calibration photos; the odd ones are never read) are split at random, many
times, into a calibration part and a test part. Each split fits the shipped photo configuration's score on the
calibration part, once with CDFs and threshold from two halves and once cross-fitted over K folds, and measures
the FPR on the test part and the detection of the validation patch, BIM and PGD photos (made from even photos by
scripts/search_imagenet.py, whose cache this reads). The same splits serve every procedure, so their FPR spreads
differ only by the procedure. Writes reports/validation/calibration_spread.md.

Run: python scripts/calibration_spread.py [--splits 400] [--n-cal 125 200] [--folds 5 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_imagenet import PHOTOS, WITHOUT_HOSTS, _photo_sets, config_signals  # noqa: E402

from pipeline.calibration import fit_calibration  # noqa: E402
from pipeline.detector import Detector  # noqa: E402
from pipeline.models import load_model  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "reports" / "validation" / "calibration_spread.md"
TARGET = 0.05
SCORED = tuple(PHOTOS.signals)  # the shipped photo score's signals


def photo_signals(patch_steps: int) -> dict[str, dict[str, np.ndarray]]:
    """Signals of the shipped photo configuration: "clean" (the 250 even photos less the transplant's hosts) and
    each validation attack."""
    model = load_model("mobilenet_v2")
    photos = _photo_sets(model, patch_steps, use_cache=True, patch_without_hosts=True)  # as the search
    sets = config_signals(Detector(model, PHOTOS), photos, patch_steps, use_cache=True, tag=WITHOUT_HOSTS)
    clean = {k: np.concatenate([sets["calibration"][k], sets["clean"][k]]) for k in sets["clean"]}
    return {"clean": clean, **{k: v for k, v in sets.items() if k not in ("calibration", "clean")}}


def spread(signals: dict, n_cal: int, procedures: dict[str, int | None], splits: int, seed: int = 0) -> dict:
    clean = signals["clean"]
    n = len(next(iter(clean.values())))
    attacks = [k for k in signals if k != "clean"]
    rng = np.random.default_rng(seed)
    out = {p: {"fpr": [], **{a: [] for a in attacks}} for p in procedures}
    for _ in range(splits):
        perm = rng.permutation(n)
        cal_rows, test_rows = perm[:n_cal], perm[n_cal:]
        for label, folds in procedures.items():
            c = fit_calibration({k: v[cal_rows] for k, v in clean.items()}, TARGET, model="mobilenet_v2",
                                method=PHOTOS.method, entropy=PHOTOS.entropy, images="", use=SCORED,
                                folds=folds)
            out[label]["fpr"].append(np.mean(c.score({k: v[test_rows] for k, v in clean.items()}) > c.threshold))
            for a in attacks:
                out[label][a].append(np.mean(c.score(signals[a]) > c.threshold))
    return {p: {k: np.asarray(v) for k, v in r.items()} for p, r in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", type=int, default=400)
    ap.add_argument("--n-cal", type=int, nargs="+", default=[125, 200])
    ap.add_argument("--folds", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--patch-steps", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    signals = photo_signals(args.patch_steps)
    attacks = [k for k in signals if k != "clean"]
    n_clean = len(next(iter(signals["clean"].values())))
    procedures = {"two halves": None, **{f"cross-fitted, {k} folds": k for k in args.folds}}
    lines = ["# How far a photo calibration's FPR strays, and cross-fitting", "", __doc__.split("\n\n")[1], "",
             f"Command: `python scripts/calibration_spread.py --splits {args.splits} --n-cal "
             f"{' '.join(map(str, args.n_cal))} --folds {' '.join(map(str, args.folds))}`. Clean even photos: "
             f"{n_clean}; validation adversarials: " + ", ".join(f"{a} {len(next(iter(signals[a].values())))}"
                                                                 for a in attacks)
             + f". Target FPR {TARGET:.0%}; signals {', '.join(SCORED)}.", ""]
    for n_cal in args.n_cal:
        res = spread(signals, n_cal, procedures, args.splits)
        lines += [f"## {n_cal} calibration photos, FPR measured on the other {n_clean - n_cal}", "",
                  "| procedure | mean FPR | SD | 90th percentile | P(FPR > 5%) | "
                  + " | ".join(f"{a} detection (mean)" for a in attacks) + " |",
                  "|---|---|---|---|---|" + "---|" * len(attacks)]
        for label, r in res.items():
            f = r["fpr"]
            lines.append(f"| {label} | {f.mean():.1%} | {f.std():.1%} | {np.quantile(f, 0.9):.1%} | "
                         f"{np.mean(f > TARGET):.0%} | " + " | ".join(f"{r[a].mean():.1%}" for a in attacks) + " |")
        lines.append("")
        print(f"n_cal {n_cal} done", flush=True)
    lines += ["The SD includes the binomial noise of the test part, the same for every procedure on the same "
              "splits; a smaller SD is a threshold that strays less.", "",
              f"Run time {(time.perf_counter() - start) / 60:.1f} min.", ""]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
