"""Fixtures for the Hub tests: our Hub-compatible server on 127.0.0.1:0, an online huggingface_hub, bundles.

tests/conftest.py sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, so its constants say offline;
``online`` patches them (and the environment, which stadapter.hub reads at call time) back for one test, and
sets HF_HUB_DISABLE_XET (LFS files then go through the LFS batch API, which the server speaks).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from hub_server import HubServer
from stadapter.bundle import Bundle
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.model_card import render_card

TOKEN = "hf_test_secret_token_0123456789"
NUM_FRAMES = 4


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def hub_factory(tmp_path, online):
    """start(lfs="auto", token=TOKEN) -> a running HubServer; all are stopped after the test."""
    servers: list[HubServer] = []

    def start(lfs: str = "auto", token: str | None = TOKEN) -> HubServer:
        server = HubServer(tmp_path / f"hub-data-{len(servers)}", token=token, lfs=lfs).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def hub(hub_factory):
    return hub_factory("auto")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundle_tensors(backbone, config: AdapterConfig, seed: int) -> dict[str, torch.Tensor]:
    """A random (not identity) adapter set, so different seeds give visibly different predictions."""
    from stadapter.model.video_vit import VideoViT

    model = VideoViT(backbone, config, NUM_FRAMES)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.init_adapter_set(g).items()}


def make_bundle(directory: Path, backbone, *, seed: int = 0, task: str = "demo", metrics: dict | None = None,
                labels: list[str] | None = None, version: int | None = None, repo: str | None = None) -> Path:
    """A tiny-backbone bundle with a full model card, saved (with its manifest) into ``directory``."""
    labels = labels or ["pan left", "pan right", "zoom in"]
    config = AdapterConfig(num_classes=len(labels), width=8, positions=("attn", "mlp"))
    bundle = Bundle(task=task, adapter=config, spec=TaskSpec(num_frames=NUM_FRAMES, frame_stride=2),
                    backbone={**backbone.describe(), "weights": "none", "fingerprint": backbone.fingerprint()},
                    labels=labels, tensors=bundle_tensors(backbone, config, seed), metrics=metrics,
                    extra={"recipe": "k400", "train": {"epochs": 1, "batch_size": 2}, "dataset": "synthetic-motion"})
    return bundle.save(directory, card=render_card(bundle, repo=repo, version=version))


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
