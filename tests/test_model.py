"""The ST-Adapter video model: exact to the paper, adapter sets as data, frozen backbone."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stadapter.config import ACTIVATIONS, AdapterConfig
from stadapter.errors import AdapterSetError, BackboneError, ConfigError, InputError
from stadapter.model.adapter import (STAdapter, activation_function, adapter_delta, depthwise_conv3d,
                                     init_adapter_tensors, st_adapter)
from stadapter.model.loading import load_backbone
from stadapter.model.video_vit import VideoViT, count_parameters
from stadapter.recipes import preset

from conftest import DINOV2, need_shared

TIMM_TINY = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&embed_dim=64&num_heads=2"


def randomize(tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in tensors.items()}


def clips(b: int = 2, t: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def timm_tiny():
    return load_backbone(TIMM_TINY, "none")


# -- exact to the paper ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [("k400", 7_417_744), ("ssv2", 14_354_094)])
def test_paper_parameter_counts_on_vit_b16(name, expected):
    bb = load_backbone("open_clip:ViT-B-16", "none")
    model = VideoViT(bb, preset(name).adapter, num_frames=8)
    assert count_parameters(model.init_adapter_set()) == expected


def test_model_info_cli_counts_k400_gmacs_within_1_percent_of_paper():
    out = subprocess.run([sys.executable, "-m", "stadapter", "model-info", "--backbone",
                          "open_clip:ViT-B-16", "--weights", "none", "--preset", "k400", "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["trainable_params"] == 7_417_744
    assert abs(result["gmacs_per_view"] - 151.7) / 151.7 < 0.01
    assert abs(result["backbone_gmacs_per_view"] - 140.6) / 140.6 < 0.01
    assert result["total_params"] > result["trainable_params"]


def test_model_info_cli_table_and_overrides():
    out = subprocess.run([sys.executable, "-m", "stadapter", "model-info", "-b", "tiny", "--weights",
                          "none", "--preset", "ssv2", "--num-classes", "7", "--frames", "4", "--json"],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    D, rr = 64, 384
    per_adapter = D * rr + rr + rr * 3 + rr + rr * D + D
    assert r["trainable_params"] == 2 * 2 * per_adapter + 7 * D + 7
    assert r["frames"] == 4
    table = subprocess.run([sys.executable, "-m", "stadapter", "model-info", "-b", "tiny", "--weights",
                            "none"], capture_output=True, text=True, check=True).stdout
    assert "trainable params" in table and "GMACs per view" in table


def test_model_summary_gives_what_model_info_printed(tiny_backbone):
    """The figures `stadapter model-info --json` printed before the summary moved into the library."""
    from stadapter.model.summary import summarize, summarize_preset

    tiny = "open_clip:ViT-B-16?head_width=32&image_size=32&layers=2&patch_size=8&width=64"
    got = summarize_preset("tiny", "none", "ssv2", num_classes=7, frames=4)
    assert got.to_dict() == {"backbone": tiny, "preset": "ssv2", "method": "st-adapter", "frames": 4,
                             "image_size": [32, 32], "trainable_params": 204999, "total_params": 318663,
                             "gmacs_per_view": 0.0204, "backbone_gmacs_per_view": 0.0078}
    probe = summarize_preset("tiny", "none", method="linear-probe").to_dict()
    assert probe == {"backbone": tiny, "preset": "k400", "method": "linear-probe", "frames": 8,
                     "image_size": [32, 32], "trainable_params": 26000, "total_params": 139664,
                     "gmacs_per_view": 0.0156, "backbone_gmacs_per_view": 0.0155}
    assert got.num_adapters == 4 and got.backbone_params == 113664 == probe["total_params"] - 26000
    # full fine-tuning retrains every backbone tensor: counted once in the total
    full = summarize(tiny_backbone, dataclasses.replace(preset("k400").adapter, method="full", num_classes=3), 4)
    assert full.total_params == full.backbone_params + 64 * 3 + 3 and full.preset == "custom"
    assert full.trainable_params == full.total_params
    with pytest.raises(ConfigError, match="frames per view must be >= 1, got 0"):
        summarize_preset("tiny", "none", frames=0)


# -- the adapter itself ----------------------------------------------------------------------------
def test_adapter_is_identity_at_init_and_bypasses_cls():
    torch.manual_seed(0)
    a = STAdapter(dim=16, width=8)
    assert torch.count_nonzero(a.conv.weight) == 0 and torch.count_nonzero(a.conv.bias) == 0
    assert torch.count_nonzero(a.fc1.bias) == 0 and torch.count_nonzero(a.fc2.bias) == 0
    assert torch.count_nonzero(a.fc1.weight) > 0
    x = torch.randn(2 * 3, 1 + 4, 16)
    assert torch.equal(a(x, num_frames=3, grid=(2, 2)), x)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    before = x.clone()
    y = a(x, num_frames=3, grid=(2, 2))
    assert torch.equal(x, before), "the input must not be written in place"
    assert torch.equal(y[:, 0], x[:, 0]), "the CLS token bypasses the adapter"
    assert not torch.allclose(y[:, 1:], x[:, 1:])


def test_module_and_functional_agree_and_activation_option():
    torch.manual_seed(1)
    a = STAdapter(dim=16, width=8, activation="gelu")
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    x = torch.randn(4, 5, 16)
    tensors = {k: v.detach() for k, v in a.named_parameters()}
    y = st_adapter(x, tensors, 2, (2, 2), activation="gelu")
    assert torch.allclose(a(x, 2, (2, 2)), y)
    assert not torch.allclose(y, st_adapter(x, tensors, 2, (2, 2), activation="none"))


@pytest.mark.parametrize("kernel", [(3, 1, 1), (5, 1, 1), (1, 1, 1), (3, 3, 3)])
def test_depthwise_conv_matches_conv3d(kernel):
    g = torch.Generator().manual_seed(2)
    B, T, H, W, r = 2, 5, 3, 4, 6
    x = torch.randn(B, T, H * W, r, generator=g)
    w = torch.randn(r, 1, *kernel, generator=g)
    b = torch.randn(r, generator=g)
    ref = F.conv3d(x.reshape(B, T, H, W, r).permute(0, 4, 1, 2, 3), w, b,
                   padding=tuple(k // 2 for k in kernel), groups=r)
    ref = ref.permute(0, 2, 3, 4, 1).reshape(B, T, H * W, r)
    assert torch.allclose(depthwise_conv3d(x, w, b, (H, W)), ref, atol=1e-5)



def test_temporal_taps_train_like_conv3d():
    """The taps written in place into one buffer give conv3d's gradients too (training runs through them)."""
    g = torch.Generator().manual_seed(3)
    B, T, HW, r, kT = 2, 5, 4, 6, 3
    x = torch.randn(B, T, HW, r, generator=g, requires_grad=True)
    w = torch.randn(r, 1, kT, 1, 1, generator=g, requires_grad=True)
    b = torch.randn(r, generator=g, requires_grad=True)
    grad = torch.randn(B, T, HW, r, generator=g)
    (depthwise_conv3d(x, w, b, (2, 2)) * grad).sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref = F.conv3d(x.reshape(B, T, 2, 2, r).permute(0, 4, 1, 2, 3), w, b, padding=(kT // 2, 0, 0), groups=r)
    (ref.permute(0, 2, 3, 4, 1).reshape(B, T, HW, r) * grad).sum().backward()
    for mine, theirs in zip(got, (x.grad, w.grad, b.grad), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5)


@pytest.mark.parametrize("kernel", [(3, 1, 1), (5, 1, 1), (1, 1, 1), None])
def test_per_clip_weights_give_each_clip_its_own_adapter(kernel):
    """The compiled bank's form: weights stacked one per clip (N, ...) broadcast through the same maths."""
    g = torch.Generator().manual_seed(4)
    sets = [{k: torch.randn(v.shape, generator=g) * 0.3 for k, v in init_adapter_tensors(16, 8, kernel).items()}
            for _ in range(3)]
    stacked = {name: torch.stack([s[name] for s in sets]) for name in sets[0]}
    T = 3
    x = torch.randn(3 * T, 1 + 4, 16, generator=g)
    out = x + adapter_delta(x, stacked, T, 1, "gelu")
    for clip, tensors in enumerate(sets):
        rows = slice(clip * T, (clip + 1) * T)
        assert torch.allclose(out[rows], st_adapter(x[rows], tensors, T, (2, 2), 1, "gelu"), atol=1e-5)
    assert not torch.allclose(out[:T], out[T:2 * T])


def test_delta_of_a_spatial_kernel_leaves_every_prefix_token_alone():
    g = torch.Generator().manual_seed(5)
    w = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in init_adapter_tensors(16, 8, (3, 3, 3)).items()}
    x = torch.randn(2 * 4, 2 + 9, 16, generator=g)  # two prefix tokens (CLS + a register), a 3 x 3 grid
    delta = adapter_delta(x, w, 4, 2, "relu", grid=(3, 3))
    assert torch.count_nonzero(delta[:, :2]) == 0 and torch.count_nonzero(delta[:, 2:]) > 0
    assert torch.allclose(x + delta, st_adapter(x, w, 4, (3, 3), 2, "relu"), atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        adapter_delta(x, w, 4, 2)


def test_every_activation_name_has_its_function():
    x = torch.linspace(-3, 3, 13)
    for name in ACTIVATIONS:
        assert activation_function(name)(x).shape == x.shape
    assert torch.equal(activation_function("none")(x), x)
    assert torch.allclose(activation_function("quick_gelu")(x), x * torch.sigmoid(1.702 * x))
    with pytest.raises(ValueError, match="unknown activation"):
        activation_function("swish")
    with pytest.raises(ValueError, match="unknown activation"):
        STAdapter(16, 8, activation="swish")

# -- the video model --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["open_clip", "timm"])
def test_identity_at_init_equals_frozen_backbone(which, tiny_backbone, timm_tiny):
    bb = tiny_backbone if which == "open_clip" else timm_tiny
    model = VideoViT(bb, AdapterConfig(num_classes=5, width=16, positions=("attn", "mlp")), 4)
    model.bind(model.init_adapter_set())
    x = clips()
    with torch.no_grad():
        cls = model.frame_tokens(x)[:, :, 0]  # (B, T, C)
        feats = bb.final_norm(cls).flatten(0, 1)
        images = x.flatten(0, 1)
        ref = bb.visual(images) if which == "open_clip" else bb.vit.forward_features(images)[:, 0]
    assert (feats - ref).abs().max() < 1e-5


def test_time_is_mixed_only_by_the_temporal_kernel(tiny_backbone):
    x = clips(b=1, t=4)
    perm = torch.tensor([2, 0, 3, 1])
    for kernel, mixes in [((3, 1, 1), True), ((1, 1, 1), False)]:
        model = VideoViT(tiny_backbone, AdapterConfig(num_classes=3, width=16, kernel=kernel), 4).eval()
        model.bind(randomize(model.init_adapter_set(), seed=3))
        with torch.no_grad():
            a = model.frame_tokens(x)[:, perm]
            b = model.frame_tokens(x[:, perm])
        assert torch.allclose(a, b, atol=1e-5) != mixes, kernel


def test_frozen_backbone_is_bitwise_unchanged_and_only_adapters_learn(tiny_backbone):
    model = VideoViT(tiny_backbone, AdapterConfig(num_classes=3, width=16, positions=("attn", "mlp")), 4)
    model.train()
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    tensors = {k: v.requires_grad_() for k, v in model.init_adapter_set().items()}
    model.bind(tensors)
    opt = torch.optim.AdamW(tensors.values(), lr=1e-2)
    labels = torch.tensor([0, 2])
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(clips()), labels).backward()
        opt.step()
    for k, v in tiny_backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.parameters())
    # The CLS token bypasses adapters, and after the last block's MLP nothing mixes patch tokens into it:
    # the last block's pre-MLP adapter (present in the official SSv2 layout) never gets a gradient.
    dead = {k for k in tensors if k.startswith("adapters.1.mlp.")}
    assert all(tensors[k].grad is not None and tensors[k].grad.abs().sum() > 0 for k in set(tensors) - dead)
    assert all(tensors[k].grad.abs().sum() == 0 for k in dead)
    assert not model.backbone.training, "a frozen backbone stays in eval mode"


def test_two_adapter_sets_bound_in_turn_without_copies(tiny_backbone, tmp_path):
    model = VideoViT(tiny_backbone, AdapterConfig(num_classes=4, width=8), 4).eval()
    s1 = randomize(model.init_adapter_set(), seed=10)
    s2 = randomize(model.init_adapter_set(), seed=11)
    x = clips()
    with torch.no_grad():
        alone1, alone2 = model(x, s1), model(x, s2)
        assert not torch.allclose(alone1, alone2)
        for tensors, expected in [(s1, alone1), (s2, alone2), (s1, alone1)]:
            model.bind(tensors)
            assert model.bound is tensors
            slot_ptrs = {t.data_ptr() for w in model._slots.values() for t in w.values()}
            assert slot_ptrs <= {t.data_ptr() for t in tensors.values()}, "binding copies no tensor"
            assert torch.equal(model(x), expected)
    # an adapter set is saved as safetensors and bound again with the same outputs
    save_file(s2, str(tmp_path / "set.safetensors"))
    model.bind(load_file(str(tmp_path / "set.safetensors")))
    with torch.no_grad():
        assert torch.equal(model(x), alone2)


@pytest.mark.parametrize("method", ["linear-probe", "adapter", "bitfit", "partial", "full"])
def test_table1_baselines_train_their_own_tensors(method, tiny_backbone):
    model = VideoViT(tiny_backbone, AdapterConfig(num_classes=3, width=8, method=method), 4).train()
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    tensors = {k: v.requires_grad_() for k, v in model.init_adapter_set().items()}
    n_backbone = sum(p.numel() for p in tiny_backbone.parameters())
    n = count_parameters(tensors)
    head = 3 * 64 + 3
    if method == "linear-probe":
        assert n == head
    elif method == "adapter":
        assert not any("conv" in k for k in tensors) and n == 2 * (64 * 8 + 8 + 8 * 64 + 64) + head
    elif method == "bitfit":
        assert all(k.endswith("bias") for k in tensors if k != "head.weight") and head < n < n_backbone
    elif method == "full":
        assert n == n_backbone + head
    else:
        assert all(k.startswith(("backbone.visual.transformer.resblocks.1.", "head.")) for k in tensors)
    model.bind(tensors)
    opt = torch.optim.SGD(tensors.values(), lr=0.5)
    F.cross_entropy(model(clips()), torch.tensor([0, 1])).backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in tiny_backbone.state_dict().items())
    with torch.no_grad():
        trained = model.eval()(clips())
        fresh = model(clips(), model.init_adapter_set(torch.Generator().manual_seed(0)))
    assert not torch.allclose(trained, fresh)


def test_adapters_in_last_k_blocks(tiny_backbone):
    model = VideoViT(tiny_backbone, AdapterConfig(num_classes=3, width=8, last_k=1, positions=("attn", "mlp")), 4)
    assert model.slots() == [(1, "attn"), (1, "mlp")]


# -- backbones --------------------------------------------------------------------------------------
def test_fingerprint_pins_weights(tiny_backbone, tmp_path):
    again = load_backbone("tiny", "none")
    assert again.fingerprint() == tiny_backbone.fingerprint(), "seeded random init is reproducible"
    state = {k: v.clone() for k, v in tiny_backbone.visual.state_dict().items()}
    save_file(state, str(tmp_path / "same.safetensors"))
    assert load_backbone("tiny", str(tmp_path / "same.safetensors")).fingerprint() == tiny_backbone.fingerprint()
    state["ln_post.bias"] = state["ln_post.bias"] + 1e-3
    save_file(state, str(tmp_path / "other.safetensors"))
    assert load_backbone("tiny", str(tmp_path / "other.safetensors")).fingerprint() != tiny_backbone.fingerprint()
    assert tiny_backbone.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_backbone_preprocessing_and_frozen(timm_tiny, tiny_backbone):
    assert timm_tiny.image_size == (32, 32) and timm_tiny.patch_size == (8, 8) and timm_tiny.grid == (4, 4)
    assert timm_tiny.mean == tuple(timm_tiny.vit.pretrained_cfg["mean"])
    for bb in (timm_tiny, tiny_backbone):
        assert not bb.training and not any(p.requires_grad for p in bb.parameters())
        bb.train()
        assert not bb.training


def test_dinov2_checkpoint_loads_strictly_and_gives_finite_features():
    path = need_shared(DINOV2)
    bb = load_backbone("timm:vit_small_patch14_dinov2?img_size=224", str(path))
    assert (bb.dim, bb.depth, bb.image_size, bb.patch_size) == (384, 12, (224, 224), (14, 14))
    model = VideoViT(bb, AdapterConfig(num_classes=2, width=32, last_k=2), 2).eval()
    model.bind(model.init_adapter_set())
    x = torch.randn(1, 2, 3, 224, 224)
    with torch.no_grad():
        feats = model.features(x)
    assert feats.shape == (1, 384) and torch.isfinite(feats).all()
    assert bb.fingerprint() != load_backbone("timm:vit_small_patch14_dinov2?img_size=224", "none").fingerprint()


# -- bad input gets one clear error each ------------------------------------------------------------
def test_bad_clip_shapes_and_frame_counts(tiny_backbone):
    model = VideoViT(tiny_backbone, AdapterConfig(num_classes=3, width=8), 4)
    model.bind(model.init_adapter_set())
    with pytest.raises(InputError, match="frames"):
        model(torch.randn(1, 5, 3, 32, 32))
    with pytest.raises(InputError, match=r"\(B, T, 3, H, W\)"):
        model(torch.randn(4, 3, 32, 32))
    with pytest.raises(InputError, match="3 x 32 x 32"):
        model(torch.randn(1, 4, 3, 48, 48))
    with pytest.raises(InputError, match="floating"):
        model(torch.zeros(1, 4, 3, 32, 32, dtype=torch.uint8))


def test_mismatched_adapter_set_is_refused_with_names(tiny_backbone):
    model = VideoViT(tiny_backbone, AdapterConfig(num_classes=3, width=8), 4)
    tensors = model.init_adapter_set()
    bad = dict(tensors)
    bad.pop("adapters.0.attn.fc1.weight")
    bad["head.weight"] = torch.zeros(5, 64)
    bad["stray"] = torch.zeros(1)
    with pytest.raises(AdapterSetError) as e:
        model.bind(bad)
    msg = str(e.value)
    assert "adapters.0.attn.fc1.weight" in msg and "head.weight has shape (5, 64)" in msg and "stray" in msg
    with pytest.raises(AdapterSetError, match="no adapter set is bound"):
        VideoViT(tiny_backbone, AdapterConfig(num_classes=3, width=8), 4)(clips())


def test_unknown_backbones_and_presets():
    for spec in ["nope", "open_clip:ViT-Q-99", "timm:not_a_model", "keras:vit"]:
        with pytest.raises(BackboneError, match="unknown"):
            load_backbone(spec, "none")
    with pytest.raises(ConfigError, match="unknown preset 'k700'.*k400"):
        preset("k700")


def test_weights_file_of_another_architecture(tmp_path, timm_tiny):
    path = tmp_path / "timm_tiny.safetensors"
    save_file(dict(timm_tiny.vit.state_dict()), str(path))
    with pytest.raises(BackboneError, match="does not fit backbone"):
        load_backbone("tiny", str(path))
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("tiny", str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read"):
        load_backbone("tiny", str(tmp_path / "junk.bin"))


def test_pretrained_weights_offline_fail_fast_naming_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec, tag in [("open_clip:ViT-B-16", "openai"), ("timm:vit_tiny_patch16_224", "pretrained")]:
        start = time.monotonic()
        with pytest.raises(BackboneError, match="local file") as e:
            load_backbone(spec, tag)
        assert time.monotonic() - start < 10
        assert "--weights" in str(e.value)
    with pytest.raises(BackboneError, match="no pretrained weights 'nope'"):
        load_backbone("open_clip:ViT-B-16", "nope")


def test_unreachable_endpoint_fails_within_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(BackboneError, match="no network"):
        load_backbone("open_clip:ViT-B-16", "openai")
    assert time.monotonic() - start < 15


# -- configs ----------------------------------------------------------------------------------------
def test_config_json_round_trip_unknown_keys_warn_missing_raise():
    cfg = preset("ssv2").adapter
    assert AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.warns(UserWarning, match="unknown keys"):
        AdapterConfig.from_dict({**cfg.to_dict(), "future_option": 1})
    with pytest.raises(ConfigError, match="missing required keys"):
        AdapterConfig.from_dict({"width": 3})
    for bad in [dict(kernel=(2, 1, 1)), dict(positions=("ffn",)), dict(method="lora"), dict(num_classes=0)]:
        with pytest.raises(ConfigError):
            AdapterConfig(**{"num_classes": 3, **bad})
    assert dataclasses.replace(cfg, method="adapter", activation=None).activation == "gelu"
