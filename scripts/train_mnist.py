"""Train the shipped MNIST CNN on the 14,262 real training digits and measure it on the 10,000 test digits.

Run: python scripts/train_mnist.py   (reads ../shared/data/mnist, writes pipeline/assets/mnist_cnn.pt and
reports/training/mnist_model.json). Holds out the last 1,262 training digits for validation; the test set is
touched once, at the end, to report accuracy.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.datasets import PROJECT_ROOT, load_mnist
from pipeline.models.mnist import MNIST_WEIGHTS, MnistNet

EPOCHS = 30
OUT = PROJECT_ROOT / "reports" / "training" / "mnist_model.json"


def shift(batch: torch.Tensor) -> torch.Tensor:
    """Random translations of up to 2 pixels: cheap augmentation for a small training set."""
    padded = F.pad(batch, (2, 2, 2, 2))
    dx, dy = np.random.randint(0, 5, size=2)
    return padded[:, :, dy : dy + 28, dx : dx + 28]


def accuracy(net: MnistNet, xs: torch.Tensor, ys: torch.Tensor) -> float:
    net.eval()
    with torch.inference_mode():
        pred = torch.cat([net(xs[i : i + 1000]).argmax(1) for i in range(0, len(xs), 1000)])
    return (pred == ys).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)

    images, labels = load_mnist("train")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(labels)
    x_train, y_train, x_val, y_val = x[:13000], y[:13000], x[13000:], y[13000:]

    net = MnistNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3,
                                                total_steps=EPOCHS * ((len(x_train) + 127) // 128))
    start = time.time()
    best = (0.0, None)
    for epoch in range(EPOCHS):
        net.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(net(shift(x_train[idx])), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(net, x_val, y_val)
        if val >= best[0]:
            best = (val, {k: v.clone() for k, v in net.state_dict().items()})
        print(f"epoch {epoch + 1:2d} loss {loss.item():.4f} val {val:.4f}")

    net.load_state_dict(best[1])
    torch.save(net.state_dict(), MNIST_WEIGHTS)
    test_images, test_labels = load_mnist("test")
    test_acc = accuracy(net, torch.from_numpy(test_images).float().div(255).unsqueeze(1),
                        torch.from_numpy(test_labels))
    report = {
        "model": "MnistNet",
        "train_images": len(x_train),
        "val_images": len(x_val),
        "val_accuracy": best[0],
        "test_images": len(test_labels),
        "test_accuracy": test_acc,
        "epochs": EPOCHS,
        "train_seconds": round(time.time() - start, 1),
        "command": "python scripts/train_mnist.py",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
