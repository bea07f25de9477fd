"""The activation_norm signal: read from the prediction's own forward pass at the Grad-CAM layer, equal to a direct
computation, carried through part/concat and the Serve stages' split, and only measured when a config asks."""

from __future__ import annotations

import threading

import numpy as np
import torch

from pipeline import Detector, DetectorConfig, Explained, load_model
from pipeline.signals import first_output, pooled_activation_norm

SIGNALS = ("prediction_shift", "map_shift", "activation_norm")


def _direct(model, x: np.ndarray) -> np.ndarray:
    """The signal computed the plain way: one forward pass with a hook, nothing shared with the detector."""
    out = {}
    handle = model.gradcam_layer.register_forward_hook(lambda _m, _i, o: out.setdefault("a", o.detach()))
    try:
        with torch.inference_mode():
            model.net(torch.from_numpy(x))
    finally:
        handle.remove()
    return out["a"].amax(dim=(2, 3)).norm(dim=1).numpy()


def test_pooled_norm_is_the_norm_of_the_channels_spatial_maxima():
    a = torch.zeros(2, 3, 4, 4)
    a[0, 0, 1, 2], a[0, 1, 3, 3], a[1, 2, 0, 0] = 3.0, 4.0, 2.0
    a[0, 0, 0, 0] = 1.0  # below its channel's maximum: does not count
    np.testing.assert_allclose(pooled_activation_norm(a), [5.0, 2.0])


def test_first_output_keeps_only_the_first_pass_and_removes_its_hook():
    layer = torch.nn.Identity()
    with first_output(layer) as seen:
        layer(torch.ones(1))
        layer(torch.zeros(1))
    assert len(seen) == 1 and seen[0].item() == 1.0
    layer(torch.full((1,), 2.0))
    assert len(seen) == 1 and not layer._forward_hooks


def test_detector_measures_activation_norm_as_a_direct_pass_does(digits):
    model = load_model("mnist")
    # saliency has one pass; Grad-CAM's second pass sees the same batch; IG's passes see scaled images, so a hook
    # that kept any pass but the prediction's would fail here
    for method in ("gradcam", "saliency", "ig"):
        det = Detector(model, DetectorConfig(method=method, signals=SIGNALS))
        x = det.prepare(digits.images[:12])
        explained = det.explain_pair(x, det.denoise(x))
        np.testing.assert_allclose(explained.signals["activation_norm"], _direct(model, x), rtol=1e-4)
        assert not model.gradcam_layer._forward_hooks
        # a batch split as the Serve Explainer splits merged calls, and joined again
        joined = Explained.concat([explained.part(0, 5), explained.part(5, 12)])
        np.testing.assert_array_equal(joined.signals["activation_norm"], explained.signals["activation_norm"])


def test_calibrated_detector_scores_activation_norm_and_omits_it_when_not_asked(digits):
    det = Detector(load_model("mnist"), DetectorConfig(signals=SIGNALS))
    cal = det.calibrate(digits.images[:200], 0.05)
    assert cal.signals["activation_norm"].tails == "upper"
    res = det.detect(digits.images[200:216])
    assert (res.signals["activation_norm"] > 0).all()
    assert "activation_norm" in res.rows()[0]
    plain = Detector(det.model, DetectorConfig()).detect(digits.images[200:216], rule="sign")
    assert "activation_norm" not in plain.signals


def test_activation_norm_from_two_threads_equals_serial(digits):
    """The hook sits on the shared model, so a gradient-only method that asks for the signal is serialised too:
    without the lock one thread's hook could catch the other thread's forward pass."""
    model = load_model("mnist")
    det = Detector(model, DetectorConfig(method="saliency", signals=SIGNALS))
    batches = [det.prepare(digits.images[i * 16 : (i + 1) * 16]) for i in range(6)]
    serial = [det.explain_pair(x, x).signals["activation_norm"] for x in batches]
    got: dict[int, np.ndarray] = {}

    def run(indices: range) -> None:
        for i in indices:
            got[i] = det.explain_pair(batches[i], batches[i]).signals["activation_norm"]

    threads = [threading.Thread(target=run, args=(range(k, 6, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):
        np.testing.assert_allclose(got[i], expected, rtol=1e-5)
