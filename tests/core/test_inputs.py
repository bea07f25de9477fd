"""Every kind of bad input gets a clear InputError naming the problem; good layouts are all accepted."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline import InputError, decode_image, read_image_file, to_float_batch


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((0, 28, 28), np.uint8), "empty batch"),
        ([], "empty batch"),
        (np.zeros((28, 0), np.uint8), "zero-size"),
        (np.zeros((2, 28, 28, 3), np.uint8), "wrong channel count"),
        (np.zeros((28, 28, 2), np.uint8), "wrong channel count"),
        (np.zeros((1, 1, 1, 28, 28), np.uint8), "2 to 4 dimensions"),
        (np.full((28, 28), np.nan, np.float32), "NaN or infinite"),
        (np.full((28, 28), np.inf, np.float32), "NaN or infinite"),
        (np.full((28, 28), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((28, 28), -0.1, np.float32), r"\[0, 1\]"),
        (np.zeros((28, 28), np.int32), "must be uint8"),
        (np.zeros((28, 28), np.complex64), "unsupported image dtype"),
        ("not an image", "expected a numpy array"),
        ([np.zeros((28, 28), np.uint8), np.zeros((14, 14), np.uint8)], "share a shape"),
    ],
)
def test_bad_input_raises_a_clear_error(images, message):
    with pytest.raises(InputError, match=message):
        to_float_batch(images, channels=1)


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (5, 28, 28), (5, 28, 28, 1), (5, 1, 28, 28)])
def test_accepted_layouts(shape):
    out = to_float_batch(np.zeros(shape, np.uint8), channels=1)
    assert out.shape[1:] == (28, 28, 1) and out.dtype == np.float32


def test_float_tensors_are_kept_exact():
    x = torch.rand(3, 1, 28, 28)
    out = to_float_batch(x, channels=1)
    assert np.array_equal(out, x.permute(0, 2, 3, 1).numpy())


def test_detector_rejects_bad_images_with_clear_errors(detector, digits):
    with pytest.raises(InputError, match="wrong image size"):
        detector.detect(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(InputError, match="NaN"):
        detector.detect(np.full((1, 28, 28), np.nan, np.float32))
    with pytest.raises(InputError, match="empty batch"):
        detector.detect(np.zeros((0, 28, 28), np.uint8))


def test_corrupt_and_non_image_files(tmp_path, digits):
    ok, png = cv2.imencode(".png", digits.images[0])
    good = tmp_path / "digit.png"
    good.write_bytes(png.tobytes())
    assert np.array_equal(read_image_file(good), digits.images[0])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.tobytes()[:40])
    text = tmp_path / "notes.png"
    text.write_text("hello, not a picture")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, message in [(truncated, "truncated PNG"), (text, "not a decodable"), (empty, "empty file"),
                          (tmp_path / "missing.png", "no such file")]:
        with pytest.raises(InputError, match=message):
            read_image_file(path)
    with pytest.raises(InputError, match="truncated PNG"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)


def test_photo_preparation_refuses_strips_it_would_blow_up():
    """Resizing the short side first, a 1×4096 strip would become 256×1,048,576 pixels before the crop; a 64:1
    panorama (256×16,384 once resized) is resized and cropped as usual."""
    from torch import nn

    from pipeline.models import MAX_RESIZED_PIXELS, TargetModel

    model = TargetModel("photo", nn.Identity(), channels=3, size=224, gradcam_layer=nn.Identity(), resize_to=256)
    assert model.prepare(np.zeros((1, 100, 6400, 3), np.uint8)).shape == (1, 224, 224, 3)
    with pytest.raises(InputError, match=f"too elongated.*limit {MAX_RESIZED_PIXELS}"):
        model.prepare(np.zeros((1, 100, 6600, 3), np.uint8))
    with pytest.raises(InputError, match="too elongated"):
        model.check_size(1, 4096)


def _peak_mib(fn) -> float:
    """Peak of the memory numpy and Python allocate while ``fn`` runs (tracemalloc sees numpy's buffers)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_digits_of_the_wrong_size_are_refused_before_any_float_copy(detector):
    """Two 4096×4096 greyscale images (a 23 KB PNG each on the wire) once became 256 MiB of float32 twice over
    before the size check refused them."""
    big = np.zeros((2, 4096, 4096), np.uint8)

    def prepare():
        with pytest.raises(InputError, match="wrong image size"):
            detector.prepare(big)

    assert _peak_mib(prepare) < 4
    with pytest.raises(InputError, match="wrong image size"):
        detector.check(big[0])


def test_a_large_photo_is_resized_as_uint8(tmp_path):
    """A 4096×4096 RGB photo (48 MiB) is resized before it is made float: 192 MiB of float32 otherwise."""
    from torch import nn

    from pipeline.models import TargetModel

    model = TargetModel("photo", nn.Identity(), channels=3, size=224, gradcam_layer=nn.Identity(), resize_to=256)
    from pipeline import Detector, DetectorConfig

    det = Detector(model, DetectorConfig())
    photo = np.random.default_rng(0).integers(0, 256, (4096, 4096, 3), dtype=np.uint8)
    out = []
    assert _peak_mib(lambda: out.append(det.prepare([photo]))) < 24
    np.testing.assert_array_equal(np.round(out[0] * 255).astype(np.uint8)[0].transpose(1, 2, 0),
                                  model.prepare(photo[None])[0])


@pytest.mark.parametrize(
    "shape, message",
    [((28, 1), "wrong image size"), ((8, 3), "wrong image size"), ((28, 28, 3), "wrong channel count"),
     ((28, 28, 2), "wrong channel count"), ((0, 28), "zero-size"), ((2, 28, 28), "wrong channel count"),
     ((2, 2, 28, 28), "H×W or H×W×C")],
)
def test_check_refuses_what_prepare_would_refuse_without_converting(detector, shape, message):
    image = np.zeros(shape, np.uint8)
    with pytest.raises(InputError, match=message):
        detector.check(image)
    with pytest.raises(InputError):
        detector.prepare(image if len(shape) != 3 or shape[-1] <= 4 else image[None])
