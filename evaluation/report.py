"""Markdown and plots for an evaluation (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.metrics import roc_curve  # noqa
from pipeline import SIGNALS, DetectorConfig  # noqa: E402

PAPER_ROWS = [("cw-l0", "CW (L0)", 99.8, 86, 91), ("cw-l2", "CW (L2)", 99.9, 86, 100),
              ("cw-linf", "CW (L∞)", 80, 96, 100), ("bim", "BIM", 80, 100, 98), ("mim", "MIM", 80, 100, 98)]
def signal_names(m: dict) -> list[str]:
    """The signals a metrics.json has per-signal ROC-AUCs for, in the registry's order (pipeline.SIGNALS), then
    any the registry does not know (a metrics file of another version)."""
    first = next(iter(m["attacks"].values()))["signal_roc_auc"]
    return [s for s in SIGNALS if s in first] + [s for s in first if s not in SIGNALS]


def pct(x: float) -> str:
    return "–" if x is None or np.isnan(x) else f"{100 * x:.1f}%"


def ci(bounds: list[float] | None) -> str:
    """A 95% interval as "a–b%" ("–" when the metrics predate intervals)."""
    return "–" if not bounds else f"{100 * bounds[0]:.1f}–{100 * bounds[1]:.1f}%"


def rate_cell(entry: dict, bold: bool = False) -> str:
    """A detection rate or FPR with its 95% interval: "99.7% (99.0–99.9)"."""
    rate, bounds = entry.get("detection_rate", entry.get("clean_fpr")), entry.get(
        "detection_rate_ci95", entry.get("clean_fpr_ci95"))
    text = pct(rate)
    if bold:
        text = f"**{text}**"
    return text if not bounds else f"{text} ({100 * bounds[0]:.1f}–{100 * bounds[1]:.1f})"


def operating_point_lines(m: dict, baselines: dict[str, dict] | None = None) -> list[str]:
    """The table of detection at every operating point: ours (bold) and each baseline's, with intervals, and the
    clean FPR each realised on the evaluation images."""
    points = m["operating_points"]
    baselines = baselines or {}
    names = ["ours", *baselines]
    header = "| attack | " + " | ".join(f"{name.replace('_', ' ')} @ {100 * p['target_fpr']:g}%"
                                          for p in points.values() for name in names) + " |"
    lines = [header, "|---|" + "---|" * (len(points) * len(names))]
    cells = []
    for key, p in points.items():
        cells.append(rate_cell(p))
        cells += [rate_cell(b["operating_points"][key]) for b in baselines.values()]
    lines.append("| clean FPR | " + " | ".join(cells) + " |")
    for attack in m["attacks"]:
        cells = []
        for key, p in points.items():
            cells.append(rate_cell(p["attacks"][attack], bold=True))
            cells += [rate_cell(b["operating_points"][key]["attacks"][attack]) for b in baselines.values()]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return lines


def defended_error_lines(m: dict, what: str) -> list[str]:
    """The table of defended error at every operating point (evaluation.metrics.defended_error), per attack."""
    points = m["operating_points"]
    lines = ["## Defended error", "",
             f"Of the correctly classified {what} each attack ran on, the share it turned into a wrong answer the "
             "detector did not flag at that point: the error an operator who trusts unflagged answers meets. The "
             "`adaptive` rows attack the model and the detector together (evaluation.adaptive_sweep); the others "
             "do not know the detector. Cells: rate (95% Wilson interval), in %.", "",
             "| attack | success (model alone) | " + " | ".join(f"@ {100 * p['target_fpr']:g}%"
                                                            for p in points.values()) + " |",
             "|---|---|" + "---|" * len(points)]
    for attack, a in m["attacks"].items():
        cells = [f"{pct(e['defended_error'])} ({ci(e['defended_error_ci95'])[:-1]})"
                 for e in (p["attacks"][attack] for p in points.values()) if "defended_error" in e]
        if cells:
            lines.append(f"| {attack} | {pct(a['attack_success_rate'])} | " + " | ".join(cells) + " |")
    return lines


def write_mnist_report(out: Path, m: dict, det, clean, scored, runs, baseline_scores, clean_eval) -> None:
    plot_entropy(out / "entropy_distributions.png", clean, scored)
    plot_roc(out / "roc.png", clean, scored, baseline_scores, det.calibration.fprs)
    plot_maps(out / "explanation_maps.png", det, clean_eval.images, runs)
    fs, mg = m["baselines"]["feature_squeezing"], m["baselines"]["magnet"]
    lines = [
        f"# MNIST evaluation of the `{m['model']}` detector: EXPLAINER (ours) beside the paper's Table 1, with the "
        "baselines re-run",
        "",
        f"Command: `{m.get('command', 'explainer evaluate --model mnist')}` — {m['seconds'] / 60:.1f} min on "
        f"{m['machine']}.",
        "",
        "## Protocol",
        "",
        f"- Detector: {m['method']} explanations, `{m['entropy']}` entropy, NLM h={m['config']['nlm']['h']} "
        f"({m['config']['nlm']['template']}×{m['config']['nlm']['template']} patch, "
        f"{m['config']['nlm']['search']}×{m['config']['nlm']['search']} search window); "
        f"score calibrated on clean images only ({m['calibration_images']}) at a target FPR of "
        f"{m['target_fpr']:.0%}"
        + (f", with the threshold set so that the target holds with {m['calibration_confidence']:.0%} confidence "
           "(not only in expectation)" if m.get("calibration_confidence") else "")
        + f"; threshold {m['threshold']:.4f}.",
        f"- Evaluation: the {m['n_clean_eval']} odd-indexed MNIST test digits, never used for calibration, give "
        "the clean FPR and the clean side of every ROC curve; the attacks run on "
        f"{m.get('clean_fpr_attacked_digits', {}).get('n', m['n_clean_eval'])} of them, evenly spread over the "
        "whole test set (both writer pools), and adversarials are made from the correctly classified ones, "
        "quantised to uint8, and counted only when still misclassified (success rate below).",
        f"- **Clean FPR {pct(m['clean_fpr'])}** (95% interval {ci(m.get('clean_fpr_ci95'))}) on "
        f"{m['n_clean_eval']} digits"
        + (f"; on the {m['clean_fpr_attacked_digits']['n']} attacked digits alone "
           f"{pct(m['clean_fpr_attacked_digits']['fpr'])} ({ci(m['clean_fpr_attacked_digits']['ci95'])})"
           if "clean_fpr_attacked_digits" in m else "") + ". Intervals are 95% Wilson intervals.",
        "- Baselines: Feature Squeezing (1-bit depth + 2×2 median) and MagNet (two autoencoders, reconstruction "
        "and divergence detectors), each thresholded at the same target FPR on the same even-indexed digits.",
        "- The paper gives no false-positive rate; its sign rule (adversarial when entropy does not decrease "
        "after denoising) is reported beside ours, with its false-positive rate on the same clean digits.",
        f"- The score combines {', '.join(s.replace('_', ' ') for s in det.calibration.signals)} "
        "(the shifts after NLM, and after the median check's 2×2 median where it is on; docs/method.md, "
        "\"The signals\"); the signals, the method and NLM h were chosen on a validation split of even-indexed "
        "digits (reports/validation/mnist_validation_search.md, reports/validation/mnist_squeeze_search.md), "
        "before this evaluation ran.",
        "",
        "## Detection at each operating point",
        "",
        "Each operating point is a threshold of the shipped calibration set for a target FPR"
        + (f" so that the target holds with {m['calibration_confidence']:.0%} confidence" if
           m.get("calibration_confidence") else "") + "; the baselines are thresholded at the same targets (the "
        "plain quantile of their clean calibration scores) on the same clean digits. Cells: rate (95% Wilson "
        f"interval), in %; the clean FPR row is measured on all {m['n_clean_eval']} odd digits. Thresholds: "
        + ", ".join(f"{100 * p['target_fpr']:g}%: {p['threshold']:.4f}" for p in m["operating_points"].values())
        + ".",
        "",
        *operating_point_lines(m, {"MagNet": mg, "FS": fs}),
        "",
        *defended_error_lines(m, "digits"),
        "",
        "## Beside the paper's Table 1 (detection rate)",
        "",
        "| attack | paper EXPLAINER | paper MagNet | paper FS | **ours** (FPR {}) | ours 95% interval | ours ROC-AUC "
        "| sign rule "
        "(FPR {}) | MagNet re-run (FPR {}) | FS re-run (FPR {}) |".format(
            pct(m["clean_fpr"]), pct(m["sign_rule_fpr"]), pct(mg["clean_fpr"]), pct(fs["clean_fpr"])),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label, p_ex, p_mg, p_fs in PAPER_ROWS:
        a = m["attacks"].get(key)
        if a is None:
            continue
        lines.append(
            f"| {label} | {p_ex}% | {p_mg}% | {p_fs}% | **{pct(a['detection_rate'])}** | "
            f"{ci(a.get('detection_rate_ci95'))} | {a['roc_auc']:.3f} | "
            f"{pct(a['sign_rule_detection_rate'])} | {pct(mg['attacks'][key]['detection_rate'])} | "
            f"{pct(fs['attacks'][key]['detection_rate'])} |")
    lines += ["", "## Every attack", "",
              "| attack | parameters | attacked | success | n adv | ours DR | ours AUC | MagNet AUC | FS AUC |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, a in m["attacks"].items():
        params = ", ".join(f"{k}={v}" for k, v in a["params"].items() if k not in ("name",))
        lines.append(
            f"| {key} | {params} | {a['attempted']} | {pct(a['attack_success_rate'])} | {a['n_adv']} | "
            f"{pct(a['detection_rate'])} | {a['roc_auc']:.3f} | {mg['attacks'][key]['roc_auc']:.3f} | "
            f"{fs['attacks'][key]['roc_auc']:.3f} |")
    lines += ["", "## ROC-AUC of each signal alone (clean vs attack)", "",
              "Values below 0.5 mean the signal moves the other way for that attack (a two-sided score uses both).",
              "", "| attack | " + " | ".join(signal_names(m)) + " | combined score |",
              "|---|" + "---|" * (len(signal_names(m)) + 1)]
    for key, a in m["attacks"].items():
        cells = [f"{a['signal_roc_auc'][s]:.3f}" for s in signal_names(m)]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {a['roc_auc']:.3f} |")
    if "methods" in m:
        names = list(m["attacks"])
        lines += ["", "## Explanation methods compared (same protocol, smaller sets)", "",
                  "| method | ms per detection | clean FPR | " + " | ".join(f"{n} DR / AUC" for n in names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for method, row in m["methods"].items():
            cells = [f"{pct(row['attacks'][n]['detection_rate'])} / {row['attacks'][n]['roc_auc']:.3f}"
                     for n in names]
            lines.append(f"| {method} | {row['ms_per_detection']:.1f} | {pct(row['clean_fpr'])} | "
                         + " | ".join(cells) + " |")
    lines += ["", "## Plots", "", "- `entropy_distributions.png`: the paper's Fig. 5/6 (entropy, clean vs each "
              "attack)", "- `roc.png`: ROC curves, ours and the baselines, "
              "false-positive rate on a log scale with the operating points marked", "- `explanation_maps.png`: the "
              "paper's Fig. 1 (maps of clean / adversarial images and their denoised copies)", ""]
    (out / "report.md").write_text("\n".join(lines))


def plot_entropy(path: Path, clean, scored) -> None:
    names = list(scored)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.5), squeeze=False)
    for j, name in enumerate(names):
        for i, sig in enumerate(("entropy_original", "entropy_change")):
            ax = axes[i, j]
            both = np.concatenate([clean.signals[sig], scored[name].signals[sig]])
            bins = np.linspace(np.percentile(both, 0.5), np.percentile(both, 99.5), 40)
            ax.hist(clean.signals[sig], bins, alpha=0.6, density=True, label="clean")
            ax.hist(scored[name].signals[sig], bins, alpha=0.6, density=True, label=name)
            ax.set_title(f"{name}: {sig.replace('_', ' ')}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_roc(path: Path, clean, scored, baseline_scores, points: list[float] = ()) -> None:
    """ROC curves with the false-positive rate on a log axis (down to one clean image in all: the operating
    points that matter, 1% and 0.1%, are invisible on a linear one), the operating points as dashed lines."""
    names = list(scored)
    floor = 1.0 / len(clean.score)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[0, j]
        curves = {"ours": (clean.score, scored[name].score),
                  "paper signal (ΔH)": (clean.signals["entropy_change"], scored[name].signals["entropy_change"])}
        for b, s in baseline_scores.items():
            curves[b.replace("_", " ")] = (s["clean"], s[name])
        for label, (c, a) in curves.items():
            fpr, tpr = roc_curve(np.asarray(c), np.asarray(a))
            ax.step(np.maximum(fpr, floor), tpr, where="post", label=label)
        for point in points:
            ax.axvline(point, color="grey", lw=0.5, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("FPR (log)")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("detection rate")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_maps(path: Path, det, clean_images: np.ndarray, runs) -> None:
    rows = [("clean", clean_images[:1])] + [(n, r.images[:1]) for n, r in list(runs.items())[:3] if len(r.images)]
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    for i, (name, img) in enumerate(rows):
        x = det.prepare(img)
        xd = det.denoise(x)
        maps = det.explain_pair(x, xd).maps.sum(1)
        for j, (title, im) in enumerate([(f"{name}", _pixels(x[0])), (f"{name} map", maps[0]),
                                         (f"{name} denoised", _pixels(xd[0])), ("denoised map", maps[1])]):
            ax = axes[i, j]
            lim = np.abs(im).max() or 1
            ax.imshow(im, cmap="gray" if j % 2 == 0 else "bwr", vmin=0 if j % 2 == 0 else -lim,
                      vmax=1 if j % 2 == 0 else lim)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _pixels(x: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> what imshow takes: (H, W) for grey, (H, W, 3) for colour."""
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def photos_line(m: dict) -> str:
    """The protocol's first line: which photos calibrated, trained the patch and were evaluated."""
    if "protocol" in m:  # a user's bundle on their own photos (evaluation.imagenet.evaluate_bundle)
        return f"- Photos: {m['protocol']} (model top-1 on them {pct(m['clean_top1'])})."
    return (
        "- Photos that no ImageNet model trained on, from three sources: the ImageNet sample "
        "(`../shared/data/imagenet-sample/`, one photo per class of 500), the NIPS 2017 web photos (`nips17/`, "
        "never in ImageNet) and Imagenette's ImageNet-validation photos (`imagenette/`, source `imagenet-val`), "
        "resized to 256 and centre-cropped to 224 once. The ImageNet sample's even photos, and four fifths of "
        "each other set (positions not 4 mod 5), calibrate the detector "
        f"({m['calibration_images']}) and train the universal patch"
        + (f" ({m['attacks']['patch']['training_photos']} of them: not the hosts, which an operator keeps private)"
           if "training_photos" in m["attacks"].get("patch", {}) else "")
        + f"; the other {m['n_clean_eval']} photos (the sample's odd ones, the others' positions 4 mod 5: "
        + ", ".join(f"{name} {c[1]}" for name, c in m.get("sources", {}).get("photos", {}).items())
        + f") are evaluated (model top-1 on them {pct(m['clean_top1'])}). No choice of signal, weight or "
        "parameter used them (reports/validation)."
    )


def write_imagenet_report(out: Path, m: dict, det, clean, scored, runs, eval_images: np.ndarray) -> None:
    """report.md and plots for ``explainer evaluate --model mobilenet_v2|resnet18``."""
    plot_entropy(out / "entropy_distributions.png", clean, scored)
    plot_roc(out / "roc.png", clean, scored, {}, det.calibration.fprs)
    plot_maps(out / "explanation_maps.png", det, eval_images, runs)
    config = DetectorConfig.from_dict(m["config"]).to_dict()  # metrics of any config version
    nlm, used = config["nlm"], config["signals"]
    lines = [
        f"# Photo evaluation ({m['model']}): " + ", ".join(m["attacks"]),
        "",
        f"Command: `{m['command']}` — {m['seconds'] / 60:.1f} min on {m['machine']}.",
        "",
        "## Protocol",
        "",
        photos_line(m),
        f"- Detector: {m['method']} maps, `{m['entropy']}` entropy, NLM h={nlm['h']} ({nlm['template']}×"
        f"{nlm['template']} patch, {nlm['search']}×{nlm['search']} search window)"
        + (f", the top {used['occlusion_shift']['fraction']:.0%} of each original's map inpainted and the photo "
           "classified again" if "occlusion_shift" in used else "")
        + (f", the top {used['transplant_gain']['fraction']:.0%} pasted onto {used['transplant_gain']['hosts']} "
           "clean calibration photos (the transplant's hosts, kept out of the fit) and those classified again"
           if "transplant_gain" in used else "")
        + f"; the score {'sums' if m.get('combine') == 'sum' else 'takes the largest of'} the tail scores of "
        f"{', '.join(used)}, "
        f"calibrated on clean photos only at a target FPR of {m['target_fpr']:.0%}"
        + (f" (CDFs and threshold cross-fitted over {m['calibration_folds']} folds of the calibration photos, "
           "reports/validation/calibration_spread.md)" if m.get("calibration_folds") else "")
        + ("; each operating point set to hold on every source large enough for it ("
           + ", ".join(f"{g} {c}" for g, c in m["calibration_groups"].items()) + ": the largest of the pooled "
           "threshold and each source's own)" if m.get("calibration_groups") else "")
        + f"; threshold {m['threshold']:.4f}. "
        "The signals and how they combine were chosen on validation photos only (Imagenette's ImageNet-training "
        "photos and the ImageNet sample's even photos, clean and attacked: "
        "`reports/validation/photo_signal_choice.md`).",
        "- Attacks run at 224 × 224 on correctly classified photos; adversarials are quantised to uint8 and only "
        "those that still fool the model count"
        + "".join(f"; {name} runs on {k} of the evaluation photos, spread over them (its cost)"
                  for name, k in m.get("attack_photos", {}).items() if name in m["attacks"])
        + ". The paper's sign rule is reported beside ours.",
        f"- Cost: {1000 * m['seconds_per_detection']:.0f} ms per detection on this machine (scoring the clean "
        "photos, batches of 16).",
        "",
        f"## Results (clean FPR {pct(m['clean_fpr'])}, 95% interval {ci(m.get('clean_fpr_ci95'))}, on "
        f"{m['n_clean_eval']} photos; target {m['target_fpr']:.0%})",
        "",
        "| attack | parameters | attacked | success | n adv | **detection** | 95% interval | ROC-AUC | sign rule DR "
        "(FPR {}) |".format(pct(m["sign_rule_fpr"])),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, a in m["attacks"].items():
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in a["params"].items() if k not in ("name",))
        lines.append(
            f"| {key} | {params} | {a['attempted']} | {pct(a['attack_success_rate'])} | {a['n_adv']} | "
            f"**{pct(a['detection_rate'])}** | {ci(a.get('detection_rate_ci95'))} | {a['roc_auc']:.3f} | "
            f"{pct(a['sign_rule_detection_rate'])} |")
    t = m["attacks"].get("patch", {}).get("targeted")
    if t and t.get("n_adv"):
        lines += ["", f"The patch is targeted (class {t['target_class']}). Counting as Brown et al. do, a success is a "
                  f"photo classified as the target: {pct(t['targeted_success_rate'])} of the attacked photos "
                  f"({t['n_adv']}), of which **{pct(t['detection_rate'])}** are detected (ROC-AUC "
                  f"{t['roc_auc']:.3f}). The table counts every misclassified patched photo, which also takes in "
                  "photos the patch only covered"
                  + (f"; of those other {m['attacks']['patch']['n_adv'] - t['n_adv']}, "
                     f"{pct(t['detection_rate_other_misclassified'])} are detected."
                     if "detection_rate_other_misclassified" in t else ".")]
    if "operating_points" in m:
        supported = [f"{100 * p['target_fpr']:g}%" for p in m["operating_points"].values()]
        lines += ["", "## Detection at each operating point", "",
                  f"The calibration holds a threshold for FPR {', '.join(supported)} (a conformal threshold at "
                  "FPR a needs at least 1/a - 1 held-out clean scores, so a point the calibration photos cannot "
                  "support is left out). Cells: rate (95% Wilson interval), in %; the clean FPR row is measured on "
                  f"the {m['n_clean_eval']} evaluation photos, whose intervals are wide.", "",
                  *operating_point_lines(m), "", *defended_error_lines(m, "photos")]
    if "sources" in m:
        keys = list(m["operating_points"])
        lines += ["", "## Clean FPR per photo source", "",
                  "Each operating point's realised FPR on each source's evaluation photos: flagged / photos, rate "
                  "and 95% Wilson interval. A point holds on a source when its interval reaches its target.", "",
                  "| source | photos | " + " | ".join(f"@ {100 * m['operating_points'][k]['target_fpr']:g}%"
                                                    for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for name, points in m["sources"]["fpr"].items():
            cells = [f"{p['flagged']} ({pct(p['fpr'])}, {ci(p['ci95'])})" + ("" if p["holds"] else " **above**")
                     for p in (points[k] for k in keys)]
            lines.append(f"| {name} | {points[keys[0]]['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## ROC-AUC of each signal alone (clean vs attack)", "",
              "| attack | " + " | ".join(signal_names(m)) + " | combined score |",
              "|---|" + "---|" * (len(signal_names(m)) + 1)]
    for key, a in m["attacks"].items():
        cells = [f"{a['signal_roc_auc'][s]:.3f}" for s in signal_names(m)]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {a['roc_auc']:.3f} |")
    lines += ["", "With one evaluation photo per class and a few hundred photos in all, every rate here has a "
              f"binomial standard error of a few points (about ±{100 * np.sqrt(0.05 * 0.95 / m['n_clean_eval']):.1f} "
              f"points at 5% of {m['n_clean_eval']} photos): read the 95% intervals beside the rates.", "",
              "## Plots", "", "- `entropy_distributions.png`: entropy of the maps, clean vs each attack",
              "- `roc.png`: ROC curves of our score and of the paper's entropy change",
              "- `explanation_maps.png`: maps of a clean photo and of adversarials, before and after NLM "
              "(the paper's Fig. 2)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
