"""explainer's evaluation harness: attacks, baselines, reference data sets, metrics, evaluations, reports, benches.

It measures the detection core (``pipeline``) and the streaming product (``worker``); neither imports it. The
CLI reaches it only for ``evaluate``, ``bench``, ``demo`` and calibration on the reference data sets.
"""
