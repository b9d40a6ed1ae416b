"""`stadapter push` / `stadapter pull` with the registry, against our Hub-compatible server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from hub_fixtures import (NUM_FRAMES, TOKEN, closed_port, files_of, hub, hub_factory, make_bundle,  # noqa: F401
                          online)
from stadapter.bundle import TENSORS, Bundle
from stadapter.cli.main import app
from stadapter.model_card import parse_card
from stadapter.registry import open_registry

REPO = "org/demo"
runner = CliRunner()


@pytest.fixture
def homes(tmp_path, hub, online, tiny_backbone):
    """home1 with demo:1 and demo:2 registered; an empty home2; the environment pointing at the server."""
    home1, home2 = tmp_path / "home1", tmp_path / "home2"
    with open_registry(home=home1) as reg:
        for seed in (1, 2):
            bundle = make_bundle(tmp_path / f"b{seed}", tiny_backbone, seed=seed, metrics={"top1": 0.5 + seed / 10})
            reg.register(bundle, source={"kind": "train"})
    online.setenv("HF_ENDPOINT", hub.url)
    online.setenv("HF_TOKEN", TOKEN)
    online.setenv("STADAPTER_HOME", str(home1))
    online.delenv("STADAPTER_DB", raising=False)
    return home1, home2


def run(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_push_then_pull_into_an_empty_home(homes, hub, online, tiny_backbone):
    home1, home2 = homes
    code, out = run("push", "demo:1", "--repo", REPO)
    assert code == 0, out
    assert "pushed demo:1 -> org/demo@v1" in out
    with open_registry(home=home1) as reg:
        v1 = reg.resolve("demo:1")
    c1 = hub.store.resolve(REPO, "v1")
    assert (v1.hub_repo, v1.hub_commit, v1.hub_tag) == (REPO, c1, "v1")
    # The pushed README is the full model card for this version.
    card = hub.store.read_object(hub.store.tree(REPO, c1)["README.md"]["oid"]).decode()
    meta, body = parse_card(card)
    assert meta["library_name"] == "stadapter" and meta["stadapter"]["version"] == 1
    assert "stadapter pull org/demo@v1" in body and "stadapter predict --task demo clip.mp4" in body
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 60.0

    # Unchanged: no new commit.
    commits = hub.commit_count(REPO)
    code, out = run("push", "demo:1", "--repo", REPO, "--json")
    assert code == 0, out
    assert json.loads(out)["created"] is False and json.loads(out)["commit"] == c1
    assert hub.commit_count(REPO) == commits
    code, out = run("push", "demo:2", "--repo", REPO)
    assert code == 0 and "org/demo@v2" in out, out

    # Pull v1 into an empty home: registered with its Hub source, files identical to the Hub's commit.
    online.setenv("STADAPTER_HOME", str(home2))
    code, out = run("pull", f"{REPO}@v1")
    assert code == 0, out
    assert "registered as demo:1" in out
    with open_registry(home=home2) as reg2, open_registry(home=home1) as reg1:
        got = reg2.resolve("demo:1")
        assert got.source == {"kind": "hub", "repo": REPO, "commit": c1, "revision": "v1", "tag": "v1"}
        assert (got.hub_repo, got.hub_commit) == (REPO, c1)
        pulled = reg2.materialize(got)
        tree = hub.store.tree(REPO, c1)
        assert files_of(pulled) == {n: hub.store.read_object(e["oid"]) for n, e in tree.items()
                                    if n != ".gitattributes"}
        original = reg1.materialize(reg1.resolve("demo:1"))
        assert (pulled / TENSORS).read_bytes() == (original / TENSORS).read_bytes()
        # Same predictions.
        from stadapter.model.video_vit import VideoViT

        clips = torch.randn(2, NUM_FRAMES, 3, *tiny_backbone.image_size, generator=torch.Generator().manual_seed(1))
        outs = []
        for path in (original, pulled):
            b = Bundle.load(path)
            model = VideoViT(tiny_backbone, b.adapter, NUM_FRAMES).eval()
            model.bind(b.tensors)
            with torch.no_grad():
                outs.append(model(clips))
        assert torch.equal(*outs)

    # Pulling the same commit again (by tag or by sha) is a no-op; another task name is a new version.
    for target in (f"{REPO}@v1", f"{REPO}@{c1}"):
        code, out = run("pull", target)
        assert code == 0 and "already registered as demo:1" in out, out
    code, out = run("pull", f"{REPO}@v2", "--task", "demo-copy", "--json")
    assert code == 0, out
    assert json.loads(out)["ref"] == "demo-copy:1" and json.loads(out)["registered"] is True
    with open_registry(home=home2) as reg2:
        assert [v.version for v in reg2.list_versions("demo")] == [1]
        assert reg2.resolve("demo-copy:1").source["commit"] == hub.store.resolve(REPO, "v2")


def test_tampered_file_is_refused_and_nothing_registered(homes, hub, online):
    home1, home2 = homes
    assert run("push", "demo:1", "--repo", REPO)[0] == 0
    hub.tamper(REPO, "labels.json", b'["pan left", "pan right", "zoom out"]\n')
    online.setenv("STADAPTER_HOME", str(home2))
    code, out = run("pull", f"{REPO}@v1")
    assert code == 1
    assert "labels.json does not match its sha256 in the manifest" in out and len(out.strip().splitlines()) == 1
    with open_registry(home=home2) as reg2:
        assert reg2.list_tasks() == []


def test_clear_errors(homes, hub, online):
    wrong = "hf_definitely_wrong_token_value"
    cases = [
        (("push", "demo:1", "--repo", REPO, "--token", wrong), "refused the token (401"),
        (("pull", f"{REPO}@v1", "--token", wrong), "refused the token (401"),
        (("pull", "org/missing@v1"), "repository org/missing not found"),
        (("pull", f"{REPO}@v1", "--endpoint", f"http://127.0.0.1:{closed_port()}", "--timeout", "2"),
         "cannot reach the Hub"),
        (("pull", "not-a-repo"), "not a Hub repository id"),
        (("push", "nope:1", "--repo", REPO), "no task 'nope'"),
    ]
    for args, needle in cases:
        code, out = run(*args)
        assert code == 1, (args, out)
        assert needle in " ".join(out.split()), (args, out)
        assert wrong not in out and TOKEN not in out and "Traceback" not in out
    run("push", "demo:1", "--repo", REPO)
    code, out = run("pull", f"{REPO}@v7")
    assert code == 1 and "revision 'v7' not found in org/demo" in out and "tags: v1" in " ".join(out.split())


def test_offline_pull_from_the_cache(homes, hub, online, tmp_path):
    import huggingface_hub.constants as constants

    home1, home2 = homes
    assert run("push", "demo:1", "--repo", REPO)[0] == 0
    online.setenv("STADAPTER_HOME", str(home2))
    assert run("pull", f"{REPO}@v1")[0] == 0
    hub.stop()
    online.setenv("HF_HUB_OFFLINE", "1")
    online.setattr(constants, "HF_HUB_OFFLINE", True)
    code, out = run("pull", f"{REPO}@v1")  # same registry: found by its source, no download
    assert code == 0 and "already registered as demo:1" in out, out
    other_db = tmp_path / "other.db"  # a fresh registry in the same home: the files come from the cache
    open_registry(str(other_db), home=home2, upgrade=True).close()
    code, out = run("pull", f"{REPO}@v1", "--db", str(other_db))
    assert code == 0 and "registered as demo:1" in out, out
    code, out = run("pull", f"{REPO}@v2", "--db", str(other_db))
    assert code == 1 and "HF_HUB_OFFLINE is set and this revision was never pulled" in " ".join(out.split())


def test_cli_in_its_own_process(homes, hub, tmp_path):
    """A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_DISABLE_XET from this environment at
    import, and stadapter passes endpoint and token from the environment explicitly."""
    home1, _ = homes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "STADAPTER_"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "STADAPTER_HOME": str(home1), "HF_HOME": str(tmp_path / "hf")}
    push = subprocess.run([sys.executable, "-m", "stadapter", "push", "demo:2", "--repo", REPO, "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert push.returncode == 0, push.stderr
    assert json.loads(push.stdout)["tag"] == "v2"
    env["STADAPTER_HOME"] = str(tmp_path / "home3")
    pull = subprocess.run([sys.executable, "-m", "stadapter", "pull", f"{REPO}@v2", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert pull.returncode == 0, pull.stderr
    assert json.loads(pull.stdout) == {"ref": "demo:1", "repo": REPO, "revision": "v2",
                                       "commit": hub.store.resolve(REPO, "v2"), "registered": True}
    assert TOKEN not in push.stdout + push.stderr + pull.stdout + pull.stderr
