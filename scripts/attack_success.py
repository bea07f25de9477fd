"""Success rate of each registered attack on 500 odd-indexed shipped MNIST digits, after uint8 quantisation.

Run: python scripts/attack_success.py [--n 500] [--attacks fgsm,pgd,...]   (writes reports/attacks/report.md)

Every attack runs with its ``ATTACKS`` defaults on the first ``n`` odd-indexed (evaluation) digits shipped with
the package. Its output is quantised as the detector will receive it, ``round(x * 255) / 255``, then success is
the share of the originally correctly classified digits whose prediction differs from the label. Norms are of
the quantised perturbation, averaged over all attacked digits: L0 counts changed pixels, L2 and L∞ are on the
[0, 1] scale (quantisation can move a pixel by up to 1/510 past an L∞ budget). The patch is trained on the
first 1,000 even-indexed (calibration) digits; its fitting time is reported apart from its pasting time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from evaluation.attacks import ATTACKS, AdversarialPatch
from evaluation.datasets import PROJECT_ROOT
from pipeline.models import load_model
from pipeline.samples import load_sample_digits


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div(255).unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "attacks" / "report.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    net = load_model("mnist").net
    digits = load_sample_digits()
    evaluation = digits.parity("odd").head(args.n)
    x, y = to_tensor(evaluation.images), torch.from_numpy(evaluation.labels)
    with torch.no_grad():
        correct = net(x).argmax(1) == y
    print(f"{len(x)} odd-indexed digits, clean accuracy {correct.float().mean():.3f}")

    rows = []
    for name in args.attacks.split(","):
        attack = ATTACKS[name]()
        note = ""
        if isinstance(attack, AdversarialPatch):
            t0 = time.perf_counter()
            attack.fit(net, to_tensor(digits.parity("even").head(1000).images))
            note = f" (+{time.perf_counter() - t0:.1f} s fit on 1,000 even-indexed digits)"
        t0 = time.perf_counter()
        x_adv = attack(net, x, y)
        seconds = time.perf_counter() - t0
        quantised = (x_adv * 255).round() / 255
        with torch.no_grad():
            pred = net(quantised).argmax(1)
        success = (pred[correct] != y[correct]).float().mean().item()
        delta = (quantised - x).flatten(1)
        l0 = (delta != 0).sum(1).float().mean().item()
        l2 = delta.norm(dim=1).mean().item()
        linf = delta.abs().amax(1).mean().item()
        extra = ""
        if isinstance(attack, AdversarialPatch):
            extra = f"; targeted (pred = {attack.target_class}) {(pred == attack.target_class).float().mean():.3f}"
        params = ", ".join(f"{k}={v}" for k, v in attack.params().items())
        rows.append((name, params, success, l0, l2, linf, f"{seconds:.1f}{note}", extra))
        print(f"{name:8s} success {success:.3f} L0 {l0:.1f} L2 {l2:.3f} Linf {linf:.3f} {seconds:.1f}s{note}{extra}")

    lines = [
        "# Attack success on the shipped MNIST model",
        "",
        f"Written by `scripts/attack_success.py`: {len(x)} odd-indexed shipped test digits (clean accuracy "
        f"{correct.float().mean():.3f}), each attack with its `evaluation.attacks.ATTACKS` defaults, outputs "
        "quantised to uint8 (`round(x*255)/255`) before classification. Success = prediction differs from the "
        "label, over the originally correct digits. Norms are means over all attacked digits of the quantised "
        "perturbation (L0 = changed pixels of 784, L2 / L∞ on the [0, 1] scale). Seconds: wall time of "
        f"`attack(model, x, y)` on the whole batch of {len(x)}, 2 shared CPU cores (other jobs were running, so "
        "timings are upper bounds).",
        "",
        "| attack | parameters | success | mean L0 | mean L2 | mean L∞ | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, params, success, l0, l2, linf, seconds, extra in rows:
        lines.append(
            f"| {name} | {params} | {success:.3f}{extra} | {l0:.1f} | {l2:.3f} | {linf:.3f} | {seconds} |"
        )
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
