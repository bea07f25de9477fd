"""``explainer bench`` end to end on a small sample (no streaming, no ImageNet): the report is written from real
measurements, and every ratio is taken within a round against the floor timed beside it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.datasets import SHARED_DATA
from evaluation.stream_bench import BATCH, FLOOR_PEER_BATCHES, ROUNDS, run_bench


def test_bench_writes_results_and_report_with_per_round_ratios(tmp_path):
    r = run_bench(tmp_path, n=128, streaming_runs=False, imagenet=False, log=lambda m: None)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["in_process"]["throughput"] == r["in_process"]["throughput"] > 0
    rounds = r["in_process"]["ratio_to_floor_rounds"]
    assert len(rounds) == ROUNDS
    assert r["in_process"]["ratio_to_floor"] == float(np.median(rounds))
    expected = [d / f for d, f in zip(r["in_process"]["rounds"], r["floor"]["rounds"], strict=True)]
    np.testing.assert_allclose(rounds, expected)
    # the stricter peer: in each round the best of the floor's timings at every batch, the one at BATCH included
    fastest = r["floor_fastest_batch"]
    assert all(b in FLOOR_PEER_BATCHES for b in fastest["batches"])
    by_batch = r["floor_by_batch"]
    assert set(by_batch) == set(FLOOR_PEER_BATCHES) and by_batch[BATCH]["rounds"] == r["floor"]["rounds"]
    np.testing.assert_allclose(fastest["rounds"], np.max([v["rounds"] for v in by_batch.values()], axis=0))
    np.testing.assert_allclose(r["in_process"]["ratio_to_floor_fastest_batch_rounds"],
                               np.array(r["in_process"]["rounds"]) / np.array(fastest["rounds"]))
    # the floor with the checks' forward passes counts the median check of the shipped MNIST configuration
    assert r["floor_with_checks"]["inference_passes_per_image"] == 1
    report = (tmp_path / "report.md").read_text()
    assert "of the floor" in report and "per round" in report and (tmp_path / "bench.png").exists()


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-sample" / "labels.csv").exists(),
                    reason="needs ../shared/data/imagenet-sample")
def test_photo_bench_times_one_model_on_a_device_beside_its_floor(tmp_path):
    from evaluation.stream_bench import run_photo_bench

    r = run_photo_bench(tmp_path, "resnet18", device="cpu", n=3, batch=2, log=lambda m: None)["photo"]
    saved = json.loads((tmp_path / "metrics.json").read_text())["photo"]
    assert saved["detections_per_s"] == r["detections_per_s"] > 0 and r["batch"] == 2 and r["photos"] == 3
    assert r["device"].startswith("CPU") and r["weights"] == "random (timing only)"
    assert r["ratio_to_floor"] == (r["floor_seconds_per_image"] / r["seconds_per_detection"])
    report = (tmp_path / "report.md").read_text()
    assert "detections/s" in report and "the detector reaches" in report


def test_bench_cli_refuses_options_it_would_ignore_and_unknown_models(tmp_path):
    from typer.testing import CliRunner

    from worker.cli import full_app

    app, runner = full_app(), CliRunner()
    for args, says in ((["--device", "cuda"], "apply to a photo model alone"),
                       (["--model", "vgg"], "unknown model"),
                       (["--model", "resnet18", "--photos", str(tmp_path)], "not found")):
        res = runner.invoke(app, ["bench", "--out", str(tmp_path / "out"), *args])
        assert res.exit_code != 0 and says in res.output, (args, res.output)
