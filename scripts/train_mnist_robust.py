"""Adversarially train the digits CNN (PGD-AT, Madry et al. 2018) for the robust digits detector, on 2 CPU cores.

Run: python scripts/train_mnist_robust.py   (reads ../shared/data/mnist, writes .explainer/models/mnist_robust.pt
and reports/training/mnist_robust.json), then calibrate it into the shipped ``mnist-robust`` bundle as the shipped
digits detector is calibrated (the even test digits and the held-out training digits, 95% confidence):

    explainer calibrate --model mnist --weights .explainer/models/mnist_robust.pt --confidence 0.95 \
        --name mnist-robust --out pipeline/assets/detectors/mnist-robust

The same architecture as the shipped model (:class:`pipeline.models.mnist.MnistNet`), so the bundle is a built-in
model with a state dict (data, no code) and the detector's cost per digit is unchanged. Trained on the same 13,000
training digits; the last 1,262 stay out for calibration, the test set is touched once, at the end.

Each batch is replaced by its PGD adversarial (``STEPS`` signed steps of ``ALPHA`` from a uniform random start in
the L∞ ball) and the network is trained on the adversarials alone. The ball's radius ramps from 0 to ``EPS`` over
the first ``RAMP`` epochs: a small network trained at ε 0.3 from the first step often stalls at chance (Madry et
al. report the same for small capacities). ``EPS`` is a little above the 0.3 the detector is evaluated at, a
margin for the evaluation's stronger attacks (more steps, restarts). The checkpoint kept is the one with the best
robust accuracy (PGD-20 at 0.3) on the held-out digits (which the calibration then uses too: the choice of an
epoch reads their robust accuracy, never a detector score).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_mnist import shift  # the shipped model's augmentation (scripts/ is this script's path)

from evaluation.datasets import HELD_OUT_TRAIN_START, PROJECT_ROOT, load_mnist
from pipeline.models.mnist import MnistNet

EPS = 0.32
STEPS = 10
ALPHA = 0.05
RAMP = 6
EPOCHS = 40
WEIGHTS = PROJECT_ROOT / ".explainer" / "models" / "mnist_robust.pt"
RECORD = PROJECT_ROOT / "reports" / "training" / "mnist_robust.json"


def pgd(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, alpha: float) -> torch.Tensor:
    """L∞ PGD on the cross-entropy from a uniform random start, in [0, 1]."""
    if eps <= 0:
        return x
    delta = torch.empty_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(net((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def accuracy(net: MnistNet, x: torch.Tensor, y: torch.Tensor, eps: float = 0.0, steps: int = 20) -> float:
    """Clean accuracy, or robust accuracy under PGD-``steps`` at ``eps`` (step eps/8)."""
    net.eval()
    right = 0
    for i in range(0, len(x), 500):
        xb, yb = x[i : i + 500], y[i : i + 500]
        if eps:
            with torch.enable_grad():
                xb = pgd(net, xb, yb, eps, steps, eps / 8)
        with torch.inference_mode():
            right += int((net(xb).argmax(1) == yb).sum())
    return right / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)

    images, labels = load_mnist("train")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(labels)
    x_train, y_train = x[:HELD_OUT_TRAIN_START], y[:HELD_OUT_TRAIN_START]
    x_val, y_val = x[HELD_OUT_TRAIN_START:], y[HELD_OUT_TRAIN_START:]

    net = MnistNet()
    steps_per_epoch = (len(x_train) + 127) // 128
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.3)
    start = time.time()
    best: tuple[float, dict | None, int] = (-1.0, None, 0)
    history = []
    for epoch in range(args.epochs):
        eps = EPS * min(1.0, (epoch + 1) / RAMP)
        net.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            xb, yb = shift(x_train[idx]), y_train[idx]
            net.eval()  # the attack sees the network without dropout
            xa = pgd(net, xb, yb, eps, STEPS, ALPHA * eps / EPS)
            net.train()
            loss = F.cross_entropy(net(xa), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        clean, robust = accuracy(net, x_val, y_val), accuracy(net, x_val, y_val, eps=0.3)
        history.append({"epoch": epoch + 1, "eps": round(eps, 4), "val_clean": clean, "val_pgd20_0.3": robust,
                        "seconds": round(time.time() - start)})
        print(json.dumps(history[-1]), flush=True)
        if eps >= EPS and robust >= best[0]:
            best = (robust, {k: v.clone() for k, v in net.state_dict().items()}, epoch + 1)

    net.load_state_dict(best[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), args.out)
    test_images, test_labels = load_mnist("test")
    xt, yt = torch.from_numpy(test_images).float().div(255).unsqueeze(1), torch.from_numpy(test_labels)
    odd = slice(1, None, 2)
    record = {
        "model": "MnistNet", "method": "PGD adversarial training (Madry et al. 2018)",
        "eps": EPS, "steps": STEPS, "alpha": ALPHA, "ramp_epochs": RAMP, "epochs": args.epochs,
        "train_images": len(x_train), "val_images": len(x_val), "kept_epoch": best[2],
        "val_pgd20_0.3": best[0],
        "test_accuracy": accuracy(net, xt, yt),
        "test_odd_pgd20_0.3": accuracy(net, xt[odd], yt[odd], eps=0.3),
        "history": history,
        "train_seconds": round(time.time() - start, 1),
        "command": "python scripts/train_mnist_robust.py",
    }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
