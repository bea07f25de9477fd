"""Train a torchvision ResNet-18 on the ten Imagenette classes, as a user brings their own photo classifier.

No pretrained weights: the network starts from torchvision's random initialisation and learns from Imagenette's
ImageNet-training photos (``../shared/data/imagenette``, source ``imagenet-train``), at a small input (photos
resized to 128, random 112 × 112 crops and flips while training, the centre crop after), so that it trains on
2 CPU cores in well under an hour. A fixed quarter of those photos (positions 3 mod 4) is never trained on: it
chooses nothing but is kept, with Imagenette's ImageNet-validation photos, as clean photos the model never saw
(calibration and evaluation, scripts/resnet_imagenette_detector.py). Outputs are the ten classes in the order of
``CLASSES`` (ImageNet indices).

Writes the state dict (``--out``, default .explainer/models/resnet18_imagenette.pt) and a JSON summary beside it
(accuracy on the held-out quarter and on the ImageNet-validation photos, epochs, seconds). Load it as a user would:
``--model torchvision.models:resnet18 --model-kwargs '{"num_classes": 10}' --weights PATH --input-size 112
--channels 3 --resize-to 128 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``.

Usage: ``python scripts/train_resnet_imagenette.py [--epochs 18]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.datasets import load_labelled_photos  # noqa: E402
from pipeline.inputs import read_image_file  # noqa: E402

CLASSES = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)  # Imagenette's ImageNet classes, in output order
RESIZE, CROP = 128, 112
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def split_rows() -> tuple[list, list, list]:
    """(training rows, held-out training rows, ImageNet-validation rows) with labels mapped to 0..9."""
    index = {c: i for i, c in enumerate(CLASSES)}
    train = [(p, index[c]) for p, c in load_labelled_photos("imagenette", "imagenet-train")]
    val = [(p, index[c]) for p, c in load_labelled_photos("imagenette", "imagenet-val")]
    return ([r for i, r in enumerate(train) if i % 4 != 3], [r for i, r in enumerate(train) if i % 4 == 3], val)


def rgb(image: np.ndarray) -> np.ndarray:
    """A grey photo (a few of Imagenette's are) as three equal channels."""
    return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB) if image.ndim == 2 or image.shape[
        -1] == 1 else image


def load(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, RESIZE, RESIZE) photos (Imagenette's are 224 × 224: resized as the product resizes), and
    labels."""
    images = np.stack([cv2.resize(rgb(read_image_file(p)), (RESIZE, RESIZE), interpolation=cv2.INTER_AREA)
                       for p, _ in rows])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([y for _, y in rows])


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> the network's input: [0, 1] floats, ImageNet mean and std (the product applies these as
    ``--mean``/``--std``), channels-last."""
    x = x.float().div(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random CROP × CROP crops and horizontal flips of uint8 (N, 3, RESIZE, RESIZE), normalised."""
    n = len(x)
    top = torch.randint(0, RESIZE - CROP + 1, (n,), generator=gen)
    left = torch.randint(0, RESIZE - CROP + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([x[i, :, t : t + CROP, s : s + CROP] for i, (t, s) in enumerate(zip(top.tolist(),
                                                                                           left.tolist(),
                                                                                           strict=True))])
    out[flip] = out[flip].flip(3)
    return normalise(out)


def centre(x: torch.Tensor) -> torch.Tensor:
    o = (RESIZE - CROP) // 2
    return normalise(x[:, :, o : o + CROP, o : o + CROP])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(centre(x[i : i + 128])).argmax(1)
                          for i in range(0, len(x), 128)])
    return float((pred == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=ROOT / ".explainer" / "models" / "resnet18_imagenette.pt")
    args = ap.parse_args()
    torch.manual_seed(0)
    from torchvision.models import resnet18

    net = resnet18(num_classes=len(CLASSES))
    train_rows, held_rows, val_rows = split_rows()
    start = time.perf_counter()
    x_train, y_train = load(train_rows)
    x_held, y_held = load(held_rows)
    x_val, y_val = load(val_rows)
    print(f"{len(x_train)} training, {len(x_held)} held-out and {len(x_val)} validation photos in "
          f"{time.perf_counter() - start:.0f}s", flush=True)
    model = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * ((len(x_train) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator().manual_seed(0)
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total, t = 0.0, time.perf_counter()
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            xb = augment(x_train[idx], gen)
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        held = accuracy(model, x_held, y_held)
        history.append({"epoch": epoch + 1, "loss": total / len(x_train), "held_out_accuracy": held,
                        "seconds": time.perf_counter() - t})
        print(f"epoch {epoch + 1}: loss {total / len(x_train):.3f}, held-out accuracy {held:.1%} "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    net.eval()
    torch.save(net.state_dict(), args.out)
    summary = {"command": "python scripts/train_resnet_imagenette.py " + " ".join(sys.argv[1:]),
               "classes": CLASSES, "input": {"resize_to": RESIZE, "crop": CROP, "mean": MEAN, "std": STD},
               "train_photos": len(x_train), "held_out_photos": len(x_held), "validation_photos": len(x_val),
               "held_out_accuracy": accuracy(model, x_held, y_held), "validation_accuracy": accuracy(model, x_val,
                                                                                                   y_val),
               "epochs": history, "seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}: held-out {summary['held_out_accuracy']:.1%}, ImageNet-validation "
          f"{summary['validation_accuracy']:.1%} in {summary['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
