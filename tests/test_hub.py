"""stadapter.hub against our Hub-compatible server: the real huggingface_hub upload and download code runs,
in the regular-file mode and the LFS mode (HF_HUB_DISABLE_XET=1)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hub_fixtures import (NUM_FRAMES, TOKEN, closed_port, files_of, hub, hub_factory, make_bundle,  # noqa: F401
                          online)
from stadapter.bundle import MANIFEST, TENSORS, Bundle
from stadapter.errors import BundleError, HubError
from stadapter.hub import parse_repo_ref, pull, push, resolve_revision
from stadapter.model_card import parse_card, top_k

REPO = "org/demo"


def logits(backbone, bundle: Bundle, clips: torch.Tensor) -> torch.Tensor:
    from stadapter.model.video_vit import VideoViT

    model = VideoViT(backbone, bundle.adapter, bundle.spec.num_frames).eval()
    model.bind(bundle.tensors)
    with torch.no_grad():
        return model(clips)


@pytest.mark.parametrize("lfs", ["regular", "lfs"])
def test_push_pull_round_trip(hub_factory, tmp_path, tiny_backbone, lfs):
    server = hub_factory(lfs)
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1, metrics={"top1": 0.75, "top5": 1.0},
                      version=1, repo=REPO)
    res = push(src, REPO, endpoint=server.url, token=TOKEN, tag="v1", timeout=10)
    assert res.created and res.repo_created and res.tag == "v1" and len(res.commit) == 40
    assert res.url == f"{server.url}/{REPO}/tree/{res.commit}"
    tree = server.store.tree(REPO, res.commit)
    assert set(tree) == {".gitattributes", *files_of(src)}
    assert tree[TENSORS]["lfs"] == (lfs == "lfs") and tree["config.json"]["lfs"] == (lfs == "lfs")

    # Pull into a second, empty home: byte-identical files, the same predictions.
    home2 = tmp_path / "home2"
    got = pull(REPO, "v1", endpoint=server.url, token=TOKEN, dest=home2 / "bundle", cache_dir=home2 / "cache",
               timeout=10)
    assert got.commit == res.commit and got.path == home2 / "bundle" and not got.from_cache
    assert files_of(got.path) == files_of(src)
    assert set(got.files) == set(files_of(src)) - {MANIFEST}
    clips = torch.randn(2, NUM_FRAMES, 3, *tiny_backbone.image_size, generator=torch.Generator().manual_seed(0))
    a, b = logits(tiny_backbone, Bundle.load(src), clips), logits(tiny_backbone, Bundle.load(got.path), clips)
    assert torch.equal(a, b) and a.abs().sum() > 0

    # Pushing the unchanged bundle again makes no new commit (and the tag stays where it is).
    commits = server.commit_count(REPO)
    again = push(src, REPO, endpoint=server.url, token=TOKEN, tag="v1", timeout=10)
    assert not again.created and not again.repo_created and again.commit == res.commit
    assert server.commit_count(REPO) == commits == 2  # the repo's initial commit + ours


def test_revision_pinning_and_tags(hub, tmp_path, tiny_backbone):
    v1 = make_bundle(tmp_path / "v1", tiny_backbone, seed=1, version=1, repo=REPO)
    v2 = make_bundle(tmp_path / "v2", tiny_backbone, seed=2, version=2, repo=REPO)
    r1 = push(v1, REPO, endpoint=hub.url, token=TOKEN, tag="v1")
    r2 = push(v2, REPO, endpoint=hub.url, token=TOKEN, tag="v2")
    assert r1.commit != r2.commit and r2.created
    for rev, src in (("v1", v1), ("v2", v2), ("main", v2), (None, v2), (r1.commit, v1)):
        got = pull(REPO, rev, endpoint=hub.url, token=TOKEN, dest=tmp_path / f"pulled-{rev}",
                   cache_dir=tmp_path / "cache")
        assert files_of(got.path) == files_of(src), rev
    assert resolve_revision(REPO, "v1", endpoint=hub.url, token=TOKEN) == r1.commit
    # Re-pushing v1 after v2 is a no-op: its tag already holds it (main stays at v2).
    commits = hub.commit_count(REPO)
    again = push(v1, REPO, endpoint=hub.url, token=TOKEN, tag="v1")
    assert again.commit == r1.commit and not again.created
    assert hub.commit_count(REPO) == commits and hub.store.resolve(REPO, "main") == r2.commit
    # Tags are never moved: v1 names a commit holding another bundle; nothing is committed.
    with pytest.raises(HubError, match="tag v1 on org/demo already points at commit .* holds a different bundle"):
        push(make_bundle(tmp_path / "v3", tiny_backbone, seed=3), REPO, endpoint=hub.url, token=TOKEN, tag="v1")
    assert hub.commit_count(REPO) == commits


def test_push_removes_files_the_bundle_no_longer_has_and_pushes_branches(hub, tmp_path, tiny_backbone):
    with_metrics = make_bundle(tmp_path / "a", tiny_backbone, seed=1, metrics={"top1": 0.5})
    without = make_bundle(tmp_path / "b", tiny_backbone, seed=2)
    push(with_metrics, REPO, endpoint=hub.url, token=TOKEN, tag="v1")
    res = push(without, REPO, endpoint=hub.url, token=TOKEN, tag="v2")
    assert "metrics.json" not in hub.store.tree(REPO, res.commit)
    got = pull(REPO, "v2", endpoint=hub.url, token=TOKEN, dest=tmp_path / "p2", cache_dir=tmp_path / "c")
    assert files_of(got.path) == files_of(without)
    dev = push(with_metrics, REPO, endpoint=hub.url, token=TOKEN, branch="dev")
    assert hub.store.resolve(REPO, "main") == res.commit and hub.store.resolve(REPO, "dev") == dev.commit
    assert dev.branch == "dev" and dev.tag is None
    got = pull(REPO, "dev", endpoint=hub.url, token=TOKEN, dest=tmp_path / "pdev", cache_dir=tmp_path / "c")
    assert files_of(got.path) == files_of(with_metrics)


@pytest.mark.parametrize("lfs,name", [("regular", "config.json"), ("lfs", TENSORS)])
def test_file_changed_on_the_server_is_refused(hub_factory, tmp_path, tiny_backbone, lfs, name):
    server = hub_factory(lfs)
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    push(src, REPO, endpoint=server.url, token=TOKEN, tag="v1")
    data = bytearray((src / name).read_bytes())
    data[-2] ^= 0x01  # same size, one bit flipped
    server.tamper(REPO, name, bytes(data))
    dest = tmp_path / "pulled"
    with pytest.raises(BundleError, match=rf"{name} does not match its sha256 in the manifest"):
        pull(REPO, "v1", endpoint=server.url, token=TOKEN, dest=dest, cache_dir=tmp_path / "cache")
    assert not dest.exists() and not list(tmp_path.glob(".pulled.*"))  # nothing left behind


def test_unlisted_files_and_pickles_are_refused(hub, tmp_path, tiny_backbone):
    from huggingface_hub import CommitOperationAdd, HfApi

    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    push(src, REPO, endpoint=hub.url, token=TOKEN, tag="v1")
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_commit(REPO, [CommitOperationAdd("notes.txt", b"hello")], commit_message="extra")
    with pytest.raises(BundleError, match="not in the manifest: notes.txt"):
        pull(REPO, "main", endpoint=hub.url, token=TOKEN, dest=tmp_path / "a", cache_dir=tmp_path / "c")
    import pickle

    api.create_commit(REPO, [CommitOperationAdd("extra.pt", pickle.dumps({"x": 1}))], commit_message="pickle")
    with pytest.raises(BundleError, match="refusing pickle file.*extra.pt"):
        pull(REPO, "main", endpoint=hub.url, token=TOKEN, dest=tmp_path / "b", cache_dir=tmp_path / "c")
    # The tagged revision is still clean.
    assert pull(REPO, "v1", endpoint=hub.url, token=TOKEN, dest=tmp_path / "ok", cache_dir=tmp_path / "c").commit


def test_pickle_disguised_under_a_listed_name_is_refused(hub, tmp_path, tiny_backbone):
    import pickle

    from stadapter.bundle import write_manifest

    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    (src / TENSORS).write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    write_manifest(src)  # a consistent manifest: only the content check can catch it
    push(src, REPO, endpoint=hub.url, token=TOKEN)
    with pytest.raises(BundleError, match=f"refusing {TENSORS}: a pickle"):
        pull(REPO, endpoint=hub.url, token=TOKEN, dest=tmp_path / "p", cache_dir=tmp_path / "c")


def test_other_format_version_is_refused(hub, tmp_path, tiny_backbone):
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    push(src, REPO, endpoint=hub.url, token=TOKEN)
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["format_version"] = 99
    hub.tamper(REPO, MANIFEST, json.dumps(manifest).encode())
    with pytest.raises(BundleError, match="format version 99; this stadapter .* reads version 1"):
        pull(REPO, endpoint=hub.url, token=TOKEN, dest=tmp_path / "p", cache_dir=tmp_path / "c")


def test_clear_errors_within_the_timeout(hub, tmp_path, tiny_backbone, caplog):
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    push(src, REPO, endpoint=hub.url, token=TOKEN, tag="v1")
    kw = {"dest": tmp_path / "p", "cache_dir": tmp_path / "c", "timeout": 3}
    wrong = "hf_wrong_token_abcdefghijklmnop"
    cases = [
        (lambda: pull(REPO, "v1", endpoint=hub.url, token=wrong, **kw), "refused the token \\(401"),
        (lambda: push(src, REPO, endpoint=hub.url, token=wrong, timeout=3), "refused the token \\(401"),
        (lambda: push(src, REPO, endpoint=hub.url, token=None, timeout=3), "needs a token .*HF_TOKEN"),
        (lambda: pull("org/nope", endpoint=hub.url, token=TOKEN, **kw), "repository org/nope not found"),
        (lambda: pull(REPO, "v9", endpoint=hub.url, token=TOKEN, **kw),
         "revision 'v9' not found in org/demo .*tags: v1; branches: main"),
        (lambda: pull(REPO, "v1", endpoint=f"http://127.0.0.1:{closed_port()}", token=TOKEN, **kw),
         "cannot reach the Hub at http://127.0.0.1:\\d+"),
    ]
    for fn, pattern in cases:
        t0 = time.monotonic()
        with pytest.raises(HubError, match=pattern) as err:
            fn()
        assert time.monotonic() - t0 < 4.5, pattern
        message = str(err.value)
        assert "\n" not in message and wrong not in message and TOKEN not in message
    assert wrong not in caplog.text and TOKEN not in caplog.text
    assert not (tmp_path / "p").exists()


def test_slow_server_times_out(hub, tmp_path, monkeypatch):
    import hub_server

    original = hub_server.Handler.repo_info

    def slow(self, repo, revision):
        time.sleep(3)
        return original(self, repo, revision)

    monkeypatch.setattr(hub_server.Handler, "repo_info", slow)
    hub.store.create_repo(REPO)
    t0 = time.monotonic()
    with pytest.raises(HubError, match="did not answer within 1s"):
        pull(REPO, endpoint=hub.url, token=TOKEN, dest=tmp_path / "p", cache_dir=tmp_path / "c", timeout=1)
    assert time.monotonic() - t0 < 2.5


def test_calls_without_their_own_timeout_get_ours(hub, tmp_path, tiny_backbone, monkeypatch):
    """HfApi.create_repo sends no timeout: the request hook stadapter.hub installs gives it ours."""
    import hub_server

    original = hub_server.Handler.create_repo

    def slow(self, payload):
        time.sleep(3)
        return original(self, payload)

    monkeypatch.setattr(hub_server.Handler, "create_repo", slow)
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    t0 = time.monotonic()
    with pytest.raises(HubError, match="create org/demo: .* did not answer within 1s"):
        push(src, REPO, endpoint=hub.url, token=TOKEN, timeout=1)
    assert time.monotonic() - t0 < 2.5


def test_transient_errors_are_retried(hub, tmp_path, tiny_backbone):
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    hub.fail_next(2, 503, path_contains="/api/repos/create")
    hub.fail_next(1, 502, path_contains="/commit/")
    res = push(src, REPO, endpoint=hub.url, token=TOKEN, tag="v1", timeout=10)
    assert res.created and hub.commit_count(REPO) == 2
    hub.fail_next(2, 500, path_contains="/revision/")
    got = pull(REPO, "v1", endpoint=hub.url, token=TOKEN, dest=tmp_path / "p", cache_dir=tmp_path / "c")
    assert files_of(got.path) == files_of(src)
    hub.fail_next(20, 503, path_contains="/revision/")
    t0 = time.monotonic()
    with pytest.raises(HubError, match=r"answered 503.*\[\d attempts"):
        pull(REPO, "v1", endpoint=hub.url, token=TOKEN, dest=tmp_path / "q", cache_dir=tmp_path / "c2", timeout=2)
    assert time.monotonic() - t0 < 3


def test_offline_pull_from_the_cache(hub, tmp_path, tiny_backbone, online):
    import huggingface_hub.constants as constants

    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    res = push(src, REPO, endpoint=hub.url, token=TOKEN, tag="v1")
    cache = tmp_path / "home" / "hub" / "cache"
    online.setenv("STADAPTER_HOME", str(tmp_path / "home"))
    pull(REPO, "v1", endpoint=hub.url, token=TOKEN, dest=tmp_path / "first")  # default cache: under the home
    assert (cache / "models--org--demo" / "refs" / "v1").read_text() == res.commit
    hub.stop()
    online.setenv("HF_HUB_OFFLINE", "1")  # only the environment: huggingface_hub's constant still says online
    got = pull(REPO, "v1", endpoint=hub.url, token=TOKEN, dest=tmp_path / "offline")
    assert got.from_cache and got.commit == res.commit and files_of(got.path) == files_of(src)
    online.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_revision(REPO, "v1") == res.commit
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and this revision was never pulled"):
        pull(REPO, "v2", dest=tmp_path / "nope")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set; pushing needs the network"):
        push(src, REPO, endpoint=hub.url, token=TOKEN)
    # A corrupted cache is caught like a corrupted download.
    blob = (cache / "models--org--demo" / "snapshots" / res.commit / "labels.json").resolve()
    blob.write_text('["x", "y", "z"]\n')
    with pytest.raises(BundleError, match="labels.json does not match"):
        pull(REPO, "v1", dest=tmp_path / "bad")


def test_private_repo_needs_the_token(hub, tmp_path, tiny_backbone):
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    push(src, REPO, endpoint=hub.url, token=TOKEN, private=True)
    with pytest.raises(HubError, match="repository org/demo not found .*pass --token or set HF_TOKEN"):
        pull(REPO, endpoint=hub.url, dest=tmp_path / "p", cache_dir=tmp_path / "c", timeout=3)


def test_endpoint_and_token_from_the_environment(hub, tmp_path, tiny_backbone, online):
    online.setenv("HF_ENDPOINT", hub.url)
    online.setenv("HF_TOKEN", TOKEN)
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1)
    res = push(src, REPO, tag="v1")
    assert res.url.startswith(hub.url)
    assert pull(REPO, "v1", dest=tmp_path / "p", cache_dir=tmp_path / "c").commit == res.commit


def test_model_card_metadata(hub, tmp_path, tiny_backbone):
    src = make_bundle(tmp_path / "src", tiny_backbone, seed=1, metrics={"val": {"top1": 0.8125, "top5": 0.99}},
                      version=3, repo=REPO, labels=["walk", "run", "jump | hop"])
    text = (src / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("\n---\n", 1)[0][4:])
    assert meta == parse_card(text)[0]
    assert meta["library_name"] == "stadapter" and meta["pipeline_tag"] == "video-classification"
    assert {"stadapter", "st-adapter", "video-classification", "action-recognition"} <= set(meta["tags"])
    assert meta["datasets"] == ["synthetic-motion"] and meta["metrics"] == ["accuracy"]
    assert "base_model" not in meta  # random init: no pretrained weights to point at
    result = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == REPO and result["task"]["type"] == "video-classification"
    assert {m["name"]: m["value"] for m in result["metrics"]} == {"Top-1 accuracy": 81.25, "Top-5 accuracy": 99.0}
    assert meta["stadapter"]["task"] == "demo" and meta["stadapter"]["version"] == 3
    assert meta["stadapter"]["backbone_fingerprint"] == tiny_backbone.fingerprint()
    body = parse_card(text)[1]
    for needle in ("stadapter pull org/demo@v3", "stadapter predict --task demo clip.mp4", "| 2 | jump \\| hop |",
                   "frames per view | 4", "test views | 1 temporal x 1 spatial", "Preset: `k400`",
                   "trainable parameters |"):
        assert needle in body, needle
    # The server validates the YAML on commit, as the Hub does.
    push(src, REPO, endpoint=hub.url, token=TOKEN)


def test_model_card_helpers():
    from stadapter.model_card import base_model_id

    assert top_k({"top1": 81.2, "top5": 95.1}) == (81.2, 95.1)
    assert top_k({"test": {"acc1": 0.5}, "val": {"acc1": 0.4}}) == (50.0, None)
    assert top_k(None) == (None, None) and top_k({"loss": 0.3}) == (None, None)
    assert base_model_id({"spec": "open_clip:ViT-B-16", "weights": "openai"}) == "openai/clip-vit-base-patch16"
    assert base_model_id({"spec": "timm:vit_base_patch16_224.augreg_in21k", "weights": "pretrained"}) == \
        "timm/vit_base_patch16_224.augreg_in21k"
    assert base_model_id({"spec": "open_clip:ViT-B-16", "weights": "none"}) is None


def test_repo_ref_parsing():
    assert parse_repo_ref("org/name") == ("org/name", None)
    assert parse_repo_ref("org/name@v3") == ("org/name", "v3")
    for bad in ("name", "org/name@", "org//x", "a/b/c", "org/na--me"):
        with pytest.raises(HubError):
            parse_repo_ref(bad)


def test_server_runs_standalone(tmp_path):
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hub_server.py")), "--port", "0",
                             "--data", str(tmp_path / "data"), "--token", "t", "--lfs", "regular"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split()[3]
        import urllib.request

        req = urllib.request.Request(f"{url}/api/repos/create", data=b'{"name": "m", "organization": "o"}',
                                     headers={"Authorization": "Bearer t", "Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=5).read())["url"] == f"{url}/o/m"
        info = json.loads(urllib.request.urlopen(f"{url}/api/models/o/m", timeout=5).read())
        assert len(info["sha"]) == 40 and info["siblings"] == [{"rfilename": ".gitattributes"}]
    finally:
        proc.terminate()
        proc.wait(timeout=5)
