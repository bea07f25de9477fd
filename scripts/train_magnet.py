"""Train MagNet's two MNIST autoencoders (the baseline in evaluation/baselines/magnet.py).

Run: python scripts/train_magnet.py [--epochs 100]   (reads ../shared/data/mnist, writes
evaluation/assets/magnet_ae1.pt, evaluation/assets/magnet_ae2.pt and reports/training/magnet_training.json).

As in Meng & Chen's MNIST setup: denoising autoencoders trained with mean squared error on clean targets from
inputs with Gaussian noise (std 0.1, clipped to [0, 1]), an L2 activity regulariser of strength 1e-9 on every
convolution's output, Adam. Their 100 epochs at batch 256 and lr 1e-3 on 60,000 digits do not fit a few CPU
minutes, so here: batch 64, lr 1e-2 with cosine decay to 1e-4, 12 epochs (about 2,400 steps per autoencoder).
Trained on the first 13,000 training digits; the last 1,262 (the classifier's validation hold-out) pick the
epoch with the lowest clean reconstruction MSE. No test digit is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.baselines.magnet import AE1_WEIGHTS, AE2_WEIGHTS, MagNetAE, autoencoder_I, autoencoder_II
from evaluation.datasets import PROJECT_ROOT, load_mnist

NOISE_STD = 0.1
REG_STRENGTH = 1e-9
BATCH = 64


def val_mse(ae: MagNetAE, x: torch.Tensor) -> float:
    ae.eval()
    with torch.inference_mode():
        return F.mse_loss(ae(x), x).item()


def train(ae: MagNetAE, x_train: torch.Tensor, x_val: torch.Tensor, epochs: int, lr: float) -> dict:
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    steps_per_epoch = (len(x_train) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch, eta_min=lr / 100)
    start = time.time()
    best_val, best_state, best_epoch, history = float("inf"), None, 0, []
    for epoch in range(epochs):
        ae.train()
        perm = torch.randperm(len(x_train))
        total = 0.0
        for i in range(0, len(perm), BATCH):
            clean = x_train[perm[i : i + BATCH]]
            noisy = (clean + NOISE_STD * torch.randn_like(clean)).clamp(0, 1)
            recon, acts = ae.forward_with_activations(noisy)
            mse = F.mse_loss(recon, clean)
            reg = REG_STRENGTH * sum(a.pow(2).sum() for a in acts) / len(clean)
            loss = mse + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += mse.item() * len(clean)
        val = val_mse(ae, x_val)
        history.append({"epoch": epoch + 1, "train_mse_noisy": total / len(x_train), "val_mse_clean": val})
        if val < best_val:
            best_val, best_epoch = val, epoch + 1
            best_state = {k: v.clone() for k, v in ae.state_dict().items()}
        print(f"  epoch {epoch + 1:3d} train mse {total / len(x_train):.5f} val mse {val:.5f}", flush=True)
    ae.load_state_dict(best_state)
    ae.eval()
    with torch.inference_mode():
        val_mae = float((ae(x_val) - x_val).abs().mean().item())
    return {
        "epochs": epochs,
        "best_epoch": best_epoch,
        "final_train_mse_noisy": history[-1]["train_mse_noisy"],
        "best_val_mse_clean": best_val,
        "val_mae_clean": val_mae,
        "seconds": round(time.time() - start, 1),
        "history": history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest for these tiny convs on a shared box")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(args.threads)

    images, _ = load_mnist("train")
    x = torch.from_numpy(images.copy()).float().div(255).unsqueeze(1)
    x_train, x_val = x[:13000], x[13000:]

    start = time.time()
    results = {}
    for name, build, path in (("I", autoencoder_I, AE1_WEIGHTS), ("II", autoencoder_II, AE2_WEIGHTS)):
        print(f"autoencoder {name}", flush=True)
        ae = build()
        results[f"autoencoder_{name}"] = {"structure": ae.structure, **train(ae, x_train, x_val, args.epochs, args.lr)}
        torch.save(ae.state_dict(), path)
        print(f"  saved {path.relative_to(PROJECT_ROOT)}", flush=True)

    report = {
        "method": "MagNet (Meng & Chen 2017) MNIST autoencoders",
        "train_images": len(x_train),
        "val_images": len(x_val),
        "noise_std": NOISE_STD,
        "activity_l2": REG_STRENGTH,
        "batch_size": BATCH,
        "optimizer": f"Adam lr={args.lr}, cosine decay to {args.lr / 100:g} per step",
        "threads": args.threads,
        **results,
        "total_seconds": round(time.time() - start, 1),
        "command": "python " + " ".join(["scripts/train_magnet.py", *sys.argv[1:]]),
    }
    out = PROJECT_ROOT / "reports" / "training" / "magnet_training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("autoencoder")}, indent=2))


if __name__ == "__main__":
    main()
