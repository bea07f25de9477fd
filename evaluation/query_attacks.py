"""Query attacks on the whole service, and the query monitor replayed on what they send.

An attacker without the weights sends images and reads the verdicts. Success is an image the model gets wrong
that the detector does not flag at the deployed point: :class:`ServiceOracle` answers as the service does and logs
every image sent, per attacked image (one attacker source each). :class:`ServiceSquare` (score-based: it reads the
model's logits and the detector's score) and :class:`ServiceHopSkipJump` (decision-based: it reads only whether
the verdict is a success) attack through it. :func:`replay_monitor` runs the query monitor's rule on a source's
images, as the stream worker does (pipeline.queries for the probes, the k-of-n window of worker.streams), to find
the query at which it alerts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from evaluation.attacks.base import margin
from evaluation.attacks.hop_skip_jump import HopSkipJump
from evaluation.attacks.square import SquareAttack
from pipeline import Detector, Fingerprint, ProbeHistory, ProbeParams


@dataclass
class ServiceOracle:
    """The service's answer to a query, as the attacker reads it, at the operating point ``fpr``: the model's
    logits and the detector's score; a success is misclassified and not flagged (``fpr`` None: the model's answer
    alone, the detector ignored: what the query monitor faces where the detector does not stop an attack).
    ``blind``: σ of Gaussian noise (grey levels) the attacker adds to every image before sending it, fresh each
    time (a blinding transform against the query monitor). Every image sent and whether it succeeded is logged
    per attacked image."""

    det: Detector
    fpr: float | None = 0.01
    blind: float = 0.0
    seed: int = 0
    sent: dict[int, list[np.ndarray]] = field(default_factory=dict)
    succeeded: dict[int, list[bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.threshold = np.inf if self.fpr is None else self.det.calibration.point(self.fpr).threshold
        self.rng = np.random.default_rng(self.seed)

    def ask(self, x: torch.Tensor, y: torch.Tensor, index: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                               np.ndarray]:
        """Send the float images ``x`` (N, C, H, W) on the uint8 grid (after the blinding noise): their logits,
        the detector's scores and whether each succeeded (wrong and unflagged), logged under ``index``."""
        pixels = x.detach().cpu().mul(255).round().numpy()
        if self.blind:
            pixels = pixels + self.rng.normal(0, self.blind, pixels.shape)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        images = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        scores = np.zeros(len(images))
        if self.fpr is not None:
            with torch.enable_grad():  # the explanation needs gradients, whatever the attack's context
                scores = self.det.detect(images).score
        with torch.no_grad():
            logits = self.det.model.net(torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float().div(255).to(x.device))
        wrong = logits.argmax(1).cpu() != y.cpu()
        success = wrong.numpy() & (scores <= self.threshold)
        for j, i in enumerate(index):
            self.sent.setdefault(int(i), []).append(images[j])
            self.succeeded.setdefault(int(i), []).append(bool(success[j]))
        return logits, torch.from_numpy(scores), success


@dataclass
class ServiceSquare(SquareAttack):
    """Square through the service: the loss is -1 on a success, else the margin (floored at 0) plus how far the
    detector's score is above its threshold, times ``score_weight``."""

    oracle: ServiceOracle | None = None
    score_weight: float = 1.0

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits, scores, success = self.oracle.ask(x, y, index.tolist())
        over = (scores.to(x.device) - self.oracle.threshold).clamp_min(0)
        loss = margin(logits, y).clamp_min(0) + self.score_weight * over + 1e-3
        return torch.where(torch.from_numpy(success).to(x.device), torch.full_like(loss, -1.0), loss)


@dataclass
class ServiceHopSkipJump(HopSkipJump):
    """HopSkipJump whose oracle is the service's verdict: adversarial means a success (wrong and unflagged)."""

    oracle: ServiceOracle | None = None

    def decide(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: int) -> torch.Tensor:
        return torch.from_numpy(self.oracle.ask(x, y, [index] * len(x))[2])


@dataclass(frozen=True)
class MonitorPolicy:
    """The query monitor's rule (its defaults are the stream's, worker.streams.StreamSettings): a probing alert
    when ``k`` of a source's last ``n`` images probe against its last ``history`` images."""

    k: int
    n: int
    history: int
    params: ProbeParams = ProbeParams()


def replay_monitor(images: Iterable[np.ndarray], policy: MonitorPolicy) -> tuple[int | None, list[bool]]:
    """The 0-based index of the image at which the monitor alerts on one source's ``images`` (None: never), and
    whether each image probed."""
    history = ProbeHistory(policy.history, policy.params)
    window: deque[bool] = deque(maxlen=policy.n)
    alert, probes = None, []
    for i, image in enumerate(images):
        fp = Fingerprint.of(image, policy.params)
        probe = history.probes(fp)
        history.push(fp)
        window.append(probe)
        probes.append(probe)
        if alert is None and sum(window) >= policy.k:
            alert = i
    return alert, probes
