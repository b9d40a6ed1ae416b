"""The offline main job (`stadapter demo`), at a size that runs in CI: both methods train, the ST-Adapter
bundle is registered and predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run(*args: str, home, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STADAPTER_HOME": str(home)}
    env.pop("STADAPTER_DB", None)
    return subprocess.run([sys.executable, "-m", "stadapter", *args], capture_output=True, text=True, env=env,
                          check=check)


def test_demo_trains_both_methods_registers_and_predicts(tmp_path):
    home, out = tmp_path / "home", tmp_path / "demo"
    r = run("demo", "--out", str(out), "--clips-per-class", "4", "--epochs", "1", "--probe-epochs", "1",
            "--backbone", "tiny", "--json", home=home)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["num_train"] == 24 and result["num_val"] == 8
    methods = result["methods"]
    assert set(methods) == {"st-adapter", "linear-probe"}
    for m in methods.values():
        assert 0.0 <= m["top1"] <= 1.0
    # the probe trains the head only; the ST-Adapter also its adapters
    assert methods["linear-probe"]["trainable_params"] < methods["st-adapter"]["trainable_params"]
    assert methods["st-adapter"]["registered"] == "demo-motion:1"
    assert (out / "data" / "train.txt").is_file()

    listing = json.loads(run("ls", "--json", home=home).stdout)
    assert "demo-motion" in json.dumps(listing)
    clip = sorted((out / "data" / "move_left").glob("*.mp4"))[-1]
    pred = json.loads(run("predict", "--task", "demo-motion", str(clip), "--top-k", "8", "--json",
                          home=home).stdout)
    assert "move_left" in json.dumps(pred)  # labels of the registered bundle

    # a second run reuses the written set and registers the next version
    r2 = run("demo", "--out", str(out), "--clips-per-class", "4", "--epochs", "1", "--probe-epochs", "1",
             "--backbone", "tiny", "--json", home=home)
    assert "reusing the synthetic set" in r2.stderr
    assert json.loads(r2.stdout.strip().splitlines()[-1])["methods"]["st-adapter"]["registered"] == "demo-motion:2"


def test_demo_refuses_bad_settings(tmp_path):
    r = run("demo", "--out", str(tmp_path / "d"), "--clips-per-class", "2", home=tmp_path / "home", check=False)
    assert r.returncode == 1
    assert "at least 4 clips per class" in r.stderr
