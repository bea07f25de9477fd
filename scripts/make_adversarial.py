"""Write pipeline/assets/mnist_adversarial.npz: successful adversarial digits for the demo and the tests.

Run: python scripts/make_adversarial.py
Source: the shipped odd-indexed test digits 1001..1999 (held out from calibration). Each attack (its default
parameters from evaluation.attacks.ATTACKS) runs on 120 digits; images are quantised to uint8 as a camera would
send them, and only those still misclassified after quantisation are kept, up to 100 per attack, interleaved.
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation.attacks import ATTACKS
from pipeline import load_model, load_sample_digits
from pipeline.samples import ADVERSARIAL_DIGITS

ATTACK_NAMES = ("pgd", "bim", "mim", "cw-l2", "cw-linf", "cw-l0")
PER_ATTACK = 100


def main() -> None:
    torch.manual_seed(0)
    model = load_model("mnist")
    digits = load_sample_digits().parity("odd")
    digits = type(digits)(*(a[digits.indices > 1000] for a in (digits.images, digits.labels, digits.indices)))
    x = torch.from_numpy(digits.images[:120]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(digits.labels[:120])
    per_attack = {}
    for name in ATTACK_NAMES:
        adv = ATTACKS[name]()(model.net, x, y)
        adv8 = (adv * 255).round().to(torch.uint8)
        with torch.inference_mode():
            pred = model(adv8.float().div(255)).argmax(1)
            clean_pred = model(x).argmax(1)
        ok = ((pred != y) & (clean_pred == y)).numpy()
        keep = np.flatnonzero(ok)[:PER_ATTACK]
        per_attack[name] = (adv8.squeeze(1).numpy()[keep], digits.labels[keep], digits.indices[keep])
        print(f"{name}: {ok.mean():.1%} successful, kept {len(keep)}")
    rows = []
    for k in range(PER_ATTACK):
        for name, (imgs, labels, idx) in per_attack.items():
            if k < len(imgs):
                rows.append((imgs[k], labels[k], idx[k], name))
    np.savez_compressed(
        ADVERSARIAL_DIGITS,
        images=np.stack([r[0] for r in rows]), labels=np.array([r[1] for r in rows], np.uint8),
        indices=np.array([r[2] for r in rows], np.int16), attacks=np.array([r[3] for r in rows]),
    )
    print(f"wrote {ADVERSARIAL_DIGITS}: {len(rows)} digits")


if __name__ == "__main__":
    main()
