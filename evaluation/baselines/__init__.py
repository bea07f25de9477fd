"""Baseline adversarial-example detectors re-run in the same evaluation as EXPLAINER.

* :class:`FeatureSqueezing` (Xu, Evans & Qi, NDSS 2018): softmax L1 distance to squeezed inputs.
* :class:`MagNet` (Meng & Chen, CCS 2017): autoencoder reconstruction-error and probability-divergence
  detectors, plus the reformer.
"""

from evaluation.baselines.feature_squeezing import FeatureSqueezing, median_filter, reduce_bit_depth
from evaluation.baselines.magnet import DETECTOR_NAMES, MagNet, MagNetAE, load_autoencoder

__all__ = ["DETECTOR_NAMES", "FeatureSqueezing", "MagNet", "MagNetAE", "load_autoencoder", "median_filter",
           "reduce_bit_depth"]
