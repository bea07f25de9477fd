"""The MNIST target model: a small CNN that pools early so that explanations (many passes per image) stay cheap."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models.source import load_state_dict

MNIST_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "mnist_cnn.pt"


class MnistNet(nn.Module):
    """conv3x3(16)-pool-conv3x3(32)-pool-conv3x3(64)-pool-fc(128)-fc(10) on [0,1] pixels, about 0.8 MFLOP a pass.

    Every ReLU is its own module (DeepLift and guided backprop hook them one by one); ``features[-3]``, the
    last convolution, is the Grad-CAM layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 3x3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.features[6]


def load_weights(module: nn.Module, path: str | Path, what: str, script: str) -> nn.Module:
    """Load a state_dict into ``module`` strictly, with ``weights_only=True``; eval mode. A missing file is an
    error naming it and the script that makes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} weights not found: {path} (train them with {script})")
    load_state_dict(module, path, what)
    return module.eval()


def load_mnist_net(weights: str | Path | None = None) -> MnistNet:
    """The shipped MNIST CNN (or ``weights``), loaded strictly with ``weights_only=True``, in eval mode."""
    return load_weights(MnistNet(), weights or MNIST_WEIGHTS, "MNIST", "scripts/train_mnist.py")
