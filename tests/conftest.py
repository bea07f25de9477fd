"""Shared fixtures: the shipped MNIST detector and real shipped digits (no ../shared needed)."""

from __future__ import annotations

import pytest
import torch

from pipeline import Detector, load_sample_digits

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    return load_sample_digits()


@pytest.fixture(scope="session")
def detector():
    return Detector.from_pretrained("mnist")
