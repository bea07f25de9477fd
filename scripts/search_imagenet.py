"""Choose the ImageNet detector's signals on the even-positioned photos only (never the evaluation ones).

Split, as evaluation.imagenet.even_photo_validation makes it: the even photos at even positions of that list (125)
are the calibration photos (clean) and train the universal patch (all but the 8 that the shipped configuration
makes the transplant's hosts, as the evaluation trains it); the other 125 even photos are the validation photos,
clean and attacked (patch, BIM, PGD and the early-stopped BIM at the evaluation's parameters). For each candidate
configuration the signals are computed once; each candidate set of signals is calibrated at 5% FPR on the
calibration photos only, cross-fitted over pipeline.presets.CALIBRATION_FOLDS["photos"] folds as the evaluation
does, and reported as validation FPR and detection rate / ROC-AUC per attack.
Writes reports/validation/imagenet_validation_search.md.

The photos, the attacked photos and each configuration's signals are cached under .explainer/cache/ (keyed by
the patch steps and the configuration), so trying another signal set or tail costs seconds, not half an hour.

Run: python scripts/search_imagenet.py [--patch-steps 200] [--no-cache]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from evaluation.imagenet import even_photo_validation
from evaluation.metrics import roc_auc
from pipeline import DetectorConfig, preset
from pipeline.calibration import fit_calibration
from pipeline.detector import Detector
from pipeline.models import load_model
from pipeline.presets import CALIBRATION_FOLDS
from pipeline.signals import SIGNALS

OUT = Path(__file__).resolve().parents[1] / "reports" / "validation" / "imagenet_validation_search.md"
CACHE = OUT.parents[2] / ".explainer" / "cache"
# the shipped photo configuration
PHOTOS = preset("photos")
# the shipped configuration less the transplant: Grad-CAM entropy, the occlusion shift of the top 5%, the
# prediction shift and the activation norm
WITHOUT_TRANSPLANT = replace(PHOTOS, signals={"entropy_original": {}, "occlusion_shift": {"fraction": 0.05},
                                              "prediction_shift": {}, "activation_norm": {}})


def with_signals(config: DetectorConfig, **changed: dict) -> DetectorConfig:
    """``config`` with the parameters of the named signals set (a signal not yet there is added)."""
    return replace(config, signals={**config.signals, **changed})


# the configurations tried; each one measures the signals its config names (and the base signals of
# pipeline.signals, always), whatever signal sets are then calibrated on them
CONFIGS = {
    "Grad-CAM, NLM h=10, occlusion of the top 5%, the top 15% transplanted onto 8 hosts (the shipped "
    "configuration; its signals: the row marked shipped)": PHOTOS,
    "Grad-CAM, NLM h=10, occlusion of the top 5%, no median check, no transplant": WITHOUT_TRANSPLANT,
    "Grad-CAM, NLM h=10, occlusion of the top 3%, no median check, no transplant":
        with_signals(WITHOUT_TRANSPLANT, occlusion_shift={"fraction": 0.03}),
    # a second denoiser for the attack that stops at its first success (Feature Squeezing's median, as the digits
    # use), and a stronger NLM
    "the same with a 2×2 median check (its row with occlusion_shift, prediction_shift, activation_norm and "
    "median_shift was evaluated once on the evaluation photos and reverted, docs/history.md)":
        with_signals(WITHOUT_TRANSPLANT, median_shift={"size": 2}),
    "the same with a 3×3 median check": with_signals(WITHOUT_TRANSPLANT, median_shift={"size": 3}),
    "the same with NLM h=20, no median check":
        replace(WITHOUT_TRANSPLANT, nlm=replace(WITHOUT_TRANSPLANT.nlm, h=20.0, h_color=20.0)),
}
# (signals, tail overrides): occlusion_shift is two-sided in SIGNALS (a patch raises it, BIM lowers it);
# "upper" asks whether counting only the patch's direction buys patch detection at the same FPR
UPPER = {"occlusion_shift": "upper"}
SIGNAL_SETS = (
    (("prediction_shift", "map_shift"), {}),
    (("occlusion_shift",), {}),
    (("occlusion_shift",), UPPER),
    (("entropy_original", "occlusion_shift"), {}),
    (("entropy_original", "occlusion_shift"), UPPER),
    (("occlusion_shift", "prediction_shift"), UPPER),
    (("entropy_original", "occlusion_shift", "prediction_shift"), {}),
    (("entropy_original", "occlusion_shift", "prediction_shift"), UPPER),
    # the activation norm (reports/validation/imagenet_activation_probe.md), alone and as a fourth signal
    (("activation_norm",), {}),
    (("entropy_original", "occlusion_shift", "activation_norm"), {}),
    (("occlusion_shift", "prediction_shift", "activation_norm"), {}),
    (("entropy_original", "occlusion_shift", "prediction_shift", "activation_norm"), {}),
    (("entropy_original", "occlusion_shift", "prediction_shift", "activation_norm", "median_shift"), {}),
    (("occlusion_shift", "prediction_shift", "activation_norm", "median_shift"), {}),
    (("entropy_original", "occlusion_shift", "activation_norm", "median_shift"), {}),
    # the transplant gain (reports/validation/imagenet_transplant_probe.md), in place of the entropy or beside it
    (("transplant_gain",), {}),
    (("occlusion_shift", "prediction_shift", "activation_norm", "transplant_gain"), {}),
    (("entropy_original", "occlusion_shift", "prediction_shift", "activation_norm", "transplant_gain"), {}),
)


WITHOUT_HOSTS = "patch-without-hosts"  # the cache tag of signals on the patch trained without the hosts


def _cached(path: Path, use_cache: bool, make):
    """``make()`` (a dict of arrays), stored at ``path`` as npz and read back from there next time."""
    if use_cache and path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def _photo_sets(model, patch_steps: int, use_cache: bool, patch_without_hosts: bool = False
                ) -> dict[str, np.ndarray]:
    """The validation photo sets. ``patch_without_hosts`` (the search and calibration_spread.py): the patch is
    trained without the calibration photos that the shipped configuration makes the transplant's hosts, as the
    evaluation trains it, so that the hosts are photos the patch never saw; the probes use a patch trained on
    every calibration photo."""
    def make():
        cal_images, val_images, runs = even_photo_validation(model, ("patch", "bim", "pgd"), patch_steps)
        return {"calibration": cal_images, "clean": val_images, **{k: r.images for k, r in runs.items()}}

    def make_early():  # the BIM that stops at its first success, on the same validation photos
        return {"bim-early": even_photo_validation(model, ("bim-early",), patch_steps)[2]["bim-early"].images}

    def make_without_hosts():
        hosts = Detector(model, PHOTOS).host_rows(len(sets["calibration"]))
        return {"patch": even_photo_validation(model, ("patch",), patch_steps, patch_holdout=hosts)[2]["patch"].images}

    sets = _cached(CACHE / f"imagenet_validation_sets_patch{patch_steps}.npz", use_cache, make)
    if patch_without_hosts:
        name = f"imagenet_validation_patch{patch_steps}_without_hosts{PHOTOS.params('transplant_gain').hosts}.npz"
        sets = {**sets, **_cached(CACHE / name, use_cache, make_without_hosts)}
    return {**sets, **_cached(CACHE / "imagenet_validation_sets_bim_early.npz", use_cache, make_early)}


def _config_key(config: DetectorConfig, sets=(), tag: str = "") -> str:
    """The cache key of a configuration's signals on the named photo sets; ``tag`` names a variant of the sets
    (the patch trained without the hosts)."""
    extra = sorted(s for s in sets if s not in ("calibration", "clean", "patch", "bim", "pgd"))
    return hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode() + ",".join(extra).encode()
                        + tag.encode()).hexdigest()[:12]


def config_signals(det: Detector, photos: dict[str, np.ndarray], patch_steps: int, use_cache: bool,
                   timing: dict | None = None, tag: str = "") -> dict[str, dict[str, np.ndarray]]:
    """Every signal ``det`` measures (the base signals and those its configuration names) on each set of
    ``photos`` (calibration, clean, each attack), as {set: {signal: values}}, cached per configuration;
    ``timing["ms"]`` gets the cost per detection when computed."""
    def make():
        t = time.perf_counter()
        out = {f"calibration/{k}": v for k, v in det.analyse_many(photos["calibration"], batch_size=16).items()}
        if timing is not None:
            timing["ms"] = 1000 * (time.perf_counter() - t) / len(photos["calibration"])
        for name, images in photos.items():
            if name != "calibration":
                out |= {f"{name}/{k}": v for k, v in det.analyse_many(images, batch_size=16).items()}
        return out

    if det.config.uses("transplant_gain"):  # its hosts are calibration photos, kept out of the calibration
        chosen = det.host_rows(len(photos["calibration"]))  # as Detector.calibrate picks them
        det.use_hosts(photos["calibration"][chosen])
        photos = {**photos, "calibration": np.delete(photos["calibration"], chosen, axis=0)}
    key = _config_key(det.config, photos, tag)
    flat = _cached(CACHE / f"imagenet_signals_{patch_steps}_{key}.npz", use_cache, make)
    return {name: {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(name + "/")} for name in photos}


def photo_calibration(calibration_signals: dict[str, np.ndarray], use: tuple[str, ...],
                      tails: dict[str, str] | None = None):
    """The score over ``use``, calibrated on the calibration photos' signals as the evaluation calibrates photos
    (5% target, cross-fitted over CALIBRATION_FOLDS["photos"] folds)."""
    return fit_calibration(calibration_signals, 0.05, model="mobilenet_v2", method=PHOTOS.method,
                           entropy=PHOTOS.entropy, images="", use=use, tails=tails,
                           folds=CALIBRATION_FOLDS["photos"])


def scores_as_shipped(config: DetectorConfig, use: tuple[str, ...]) -> bool:
    """Whether scoring ``use`` on ``config``'s measurements is the shipped photo detector (same denoiser, maps
    and signals, each signal with the parameters ``config`` measured it with)."""
    if any(SIGNALS[name].stage == "model" and not config.uses(name) for name in use):
        return False  # ``config`` does not measure it
    return replace(config, signals={name: config.params(name) for name in use}) == PHOTOS


def calibrated_cells(cal, signals: dict[str, dict[str, np.ndarray]], attacks: list[str]) -> str:
    """"validation FPR | detection / ROC-AUC per attack" of the calibrated score ``cal`` on the validation sets."""
    score = {k: cal.score(signals[k]) for k in ("clean", *attacks)}
    return f"{np.mean(score['clean'] > cal.threshold):.1%} | " + " | ".join(
        f"{np.mean(score[a] > cal.threshold):.1%} / {roc_auc(score['clean'], score[a]):.3f}" for a in attacks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch-steps", type=int, default=200)
    ap.add_argument("--no-cache", action="store_true", help="recompute the attacks and signals")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model("mobilenet_v2")
    photos = _photo_sets(model, args.patch_steps, not args.no_cache, patch_without_hosts=True)
    sets = {k: v for k, v in photos.items() if k != "calibration"}
    attacks = [k for k in sets if k != "clean"]
    lines = ["# ImageNet validation search (even-positioned photos only)", "", __doc__.split("\n\n")[1], "",
             f"Command: `python scripts/search_imagenet.py --patch-steps {args.patch_steps}`. Validation: "
             f"{len(sets['clean'])} clean photos; adversarials: " + ", ".join(f"{k} {len(sets[k])}" for k in attacks),
             "", "Signals marked (upper) count only the upper tail of their clean distribution; the others use "
             "the tails of pipeline.signals.SIGNALS.", ""]
    for label, config in CONFIGS.items():
        timing: dict = {}
        signals = config_signals(Detector(model, config), photos, args.patch_steps, not args.no_cache, timing,
                                 tag=WITHOUT_HOSTS)
        cost = f"{timing['ms']:.0f} ms per detection" if timing else "signals from the cache"
        lines += [f"## {label} ({cost})", "",
                  "| signals | validation FPR | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
        for use, tails in SIGNAL_SETS:
            if any(s not in signals["calibration"] for s in use):
                continue
            c = photo_calibration(signals["calibration"], use, tails)
            names = ", ".join(f"{s} ({tails[s]})" if s in tails else s for s in use)
            if scores_as_shipped(config, use) and not tails:
                names += " **(shipped)**"
            lines.append(f"| {names} | {calibrated_cells(c, signals, attacks)} |")
        lines.append("")
        print(label, "done", flush=True)
    lines.append(f"Run time {(time.perf_counter() - start) / 60:.1f} min.")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
