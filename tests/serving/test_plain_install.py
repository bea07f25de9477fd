"""A plain (non-editable) ``pip install .`` into a fresh virtual environment, then ``serve run`` of the installed
serve config from an empty folder against a real redis-server: 200 digits in the wire format give 200 verdicts,
nothing stays pending, and ``POST /detect`` answers.

The fresh environment sees this one's packages through a ``.pth`` file (torch and Ray are gigabytes; installing
them again proves nothing about this project), so pip installs the project alone, from its own files, and the
imports resolve to the installed copy, not the checkout."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import urllib.request
from pathlib import Path

import cv2
import pytest
import yaml
from streamkit import SERVE, stop_serve_run, wait_healthy

from pipeline import load_sample_digits
from worker.collect import round_trip
from worker.local_redis import LocalRedis, free_port
from worker.streams import StreamNames, connect

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("plain") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "explainer_deps.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    return python


def test_the_installed_package_carries_its_config_and_assets(installed, tmp_path):
    probe = ("import worker.embedded as e, pipeline, evaluation.baselines.magnet as m; "
             "print(e.DEFAULT_CONFIG, e.DEFAULT_CONFIG.is_file(), pipeline.__file__, m.AE1_WEIGHTS.is_file())")
    out = subprocess.run([installed, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    config, config_ok, core, magnet_ok = out.stdout.split()
    assert config_ok == magnet_ok == "True"
    assert str(ROOT) not in config and str(ROOT) not in core  # the installed copy, not the checkout


def test_serve_run_of_the_installed_config_gives_every_verdict(installed, tmp_path):
    redis = LocalRedis(tmp_path / "redis").start()
    port = free_port()
    config = yaml.safe_load(Path(subprocess.run(
        [installed, "-c", "from worker.embedded import DEFAULT_CONFIG; print(DEFAULT_CONFIG)"],
        cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()).read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"]["redis_url"] = redis.url
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the process writes to it until it is stopped
    proc = subprocess.Popen([installed, "-c", SERVE, "run", "serve.yaml"], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc, tmp_path / "serve.log")
        client, names = connect(redis.url), StreamNames()
        digits = load_sample_digits().images[:200]
        ids, got = round_trip(client, names, digits, "plain", timeout_s=180)
        assert len(got) == 200 and all("error" not in v for v in got.values())
        assert int(client.xpending(names.images, names.group)["pending"]) == 0
        ok, png = cv2.imencode(".png", digits[0])
        request = urllib.request.Request(f"http://127.0.0.1:{port}/detect", data=png.tobytes(), method="POST")
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["predicted_class"] == got["plain-0"]["predicted_class"]
    finally:
        stop_serve_run(proc)
        log.close()
        redis.stop()
