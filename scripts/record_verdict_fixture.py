"""Record the shipped MNIST detector's verdicts on shipped digits: tests/fixtures/mnist_verdicts.npz, which
tests/core/test_shipped_verdicts.py compares today's verdicts against.

    python scripts/record_verdict_fixture.py tests/fixtures/mnist_verdicts.npz
"""
import sys

import numpy as np

from pipeline import Detector, load_adversarial_digits, load_sample_digits

clean = load_sample_digits().images[:300]
adv = load_adversarial_digits().images[:300]
images = np.concatenate([clean, adv])
det = Detector.from_pretrained("mnist")
res = det.detect(images)
out = {"score": res.score, "is_adversarial": res.is_adversarial, "threshold": np.float64(res.threshold),
       "predicted_class": res.predicted_class, "confidence": res.confidence, "denoised_class": res.denoised_class}
for k, v in res.signals.items():
    out["signal_" + k] = v
np.savez_compressed(sys.argv[1], **out)
print({k: (v.shape, v.dtype) for k, v in out.items()}, res.is_adversarial[:300].mean(), res.is_adversarial[300:].mean())
