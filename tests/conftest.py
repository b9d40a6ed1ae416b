"""Shared fixtures. Tests run on the CPU with tiny random-init backbones; nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
VIDEOS = SHARED / "data" / "videos"
DINOV2 = SHARED / "models" / "dinov2_vits14_imgfocus_timm.safetensors"

torch.set_num_threads(min(2, torch.get_num_threads()))


def need_shared(path: Path) -> Path:
    """Skip when ../shared is absent on a developer machine; fail in CI, where it must be present."""
    if not path.exists():
        if os.environ.get("STADAPTER_REQUIRE_SHARED"):
            pytest.fail(f"{path} is missing, and CI requires ../shared beside the checkout")
        pytest.skip(f"{path} is not here (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def tiny_backbone():
    from stadapter.model.loading import load_backbone

    return load_backbone("tiny", "none")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty STADAPTER_HOME for this test."""
    h = tmp_path / "home"
    monkeypatch.setenv("STADAPTER_HOME", str(h))
    return h
