"""Simulated camera streams of real photos: what a fixed camera sends, frame after frame.

A camera films one scene; every frame is the scene shifted by up to ``shift`` pixels (mount vibration), with
sensor noise (Gaussian, σ ``noise`` grey levels) and re-encoded as JPEG (quality 80–95). The alert policies
(scripts/camera_alerts.py) and the query monitor (scripts/query_monitor.py) measure their false alerts on these.
"""

from __future__ import annotations

import cv2
import numpy as np

FPS = 10  # the simulated cameras' frame rate
CAMERA_DAY = 24 * 3600 * FPS  # frames a camera sends in a day


def camera_frames(scene: np.ndarray, n: int, rng: np.random.Generator, shift: int = 4, noise: float = 2.0
                  ) -> np.ndarray:
    """``n`` frames (uint8, the scene's shape, H×W×3) of one scene: shifted, noisy, JPEG."""
    padded = cv2.copyMakeBorder(scene, shift, shift, shift, shift, cv2.BORDER_REFLECT)
    out = np.empty((n, *scene.shape), np.uint8)
    for i in range(n):
        dy, dx = rng.integers(0, 2 * shift + 1, size=2)
        frame = padded[dy : dy + scene.shape[0], dx : dx + scene.shape[1]].astype(np.float32)
        frame = np.clip(frame + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)
        ok, jpeg = cv2.imencode(".jpg", frame[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 96))])
        out[i] = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1]
    return out
