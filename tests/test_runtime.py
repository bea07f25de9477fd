"""``keep_allocations_mapped``: with it, repeated detection batches stop faulting their memory in again.

Each side runs in a fresh interpreter, because glibc's thresholds move with what a process allocated before.
"""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys
import numpy as np
from pipeline import Detector, load_sample_digits
from pipeline.runtime import keep_allocations_mapped
tuned = keep_allocations_mapped() if sys.argv[1] == "tuned" else None
det = Detector.from_pretrained("mnist")
digits = load_sample_digits().images
batch = np.resize(digits, (256, *digits.shape[1:]))
for _ in range(2):
    det.detect(batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    det.detect(batch)
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_batches_stop_faulting_pages_in_once_allocations_stay_mapped():
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned["tuned"] is True
    # measured: ~70,000-90,000 faults per 1,000 detections at batch 256 by default, a few hundred at most tuned
    assert default["faults"] > 10_000
    assert tuned["faults"] * 10 < default["faults"]
