"""torchvision ImageNet classifiers (ResNet-18, MobileNetV2) with strict, safe weight loading.

Weights never download here: they come from a path the user gives or torch's hub cache. A missing file is a
clear error naming the file expected; random weights only when ``random_init=True`` is asked for (timing only).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.models.source import load_state_dict

# torchvision's published file names: what torch.hub caches after a download on a machine with internet.
HUB_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
}
# a checkout beside ../shared (the tests, CI): its pretrained MobileNetV2
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_WEIGHTS = {"mobilenet_v2": PROJECT_ROOT.parent / "shared" / "models" / "mobilenet_v2_imagenet.pth"}
GRADCAM_LAYERS = {"resnet18": "layer4", "mobilenet_v2": "features.18"}


def _candidate_paths(name: str) -> list[Path]:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[name]
    return [p for p in (SHARED_WEIGHTS.get(name), hub) if p is not None]


def load_imagenet_net(name: str, weights: str | Path | None = None, random_init: bool = False) -> nn.Module:
    """An ImageNet-1k torchvision classifier in eval mode.

    ``weights``: a state_dict file; else the shared copy or torch's hub cache. ``random_init=True`` gives
    untrained weights for throughput benchmarks and must be asked for explicitly.
    """
    if name not in HUB_FILES:
        raise ValueError(f"unknown ImageNet model {name!r}; choose one of {sorted(HUB_FILES)}")
    net = getattr(torchvision.models, name)(weights=None)
    if random_init:
        return net.eval()
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"{name} weights not found at {path}")
    else:
        found = [p for p in _candidate_paths(name) if p.exists()]
        if not found:
            tried = ", ".join(str(p) for p in _candidate_paths(name))
            raise FileNotFoundError(
                f"{name} weights not found (looked for {tried}). Pass --weights PATH to a torchvision state_dict "
                f"({HUB_FILES[name]}), or random_init=True for timing only."
            )
        path = found[0]
    # only a file found in torch's hub cache may be torchvision's own (legacy-format) download; weights given by
    # path or carried by a bundle are checked whatever they are called
    load_state_dict(net, path, f"torchvision's {name}", published=weights is None and _is_published(path, name))
    return net.eval()


def _is_published(path: Path, name: str) -> bool:
    """Whether ``path`` is torchvision's own published file (its name and the SHA-256 prefix that name carries,
    as torch.hub checks it): such a file may be in torch's legacy format, which the archive check refuses."""
    published = HUB_FILES[name]
    if path.name != published:
        return False
    from pipeline.models.source import sha256

    return sha256(path).startswith(published.rsplit("-", 1)[1].split(".")[0])
