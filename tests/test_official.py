"""`stadapter import-official`: checkpoints in the authors' layout (linziyi96/st-adapter) become tasks whose
`stadapter predict` probabilities are the official forward's, on real clips.

The reference forward below is written from the paper's equations and the official code's key names, on the
CLIP state dict directly: none of stadapter's model code is used for it. The backbone keeps ViT-B/16's token
width (768, 12 heads of 64) and patch size, so the checkpoint tensors have the official shapes (fc1
[384, 768], conv [384, 1, 3, 1, 1], fc2 [768, 384]); the fast tests shrink depth and frame size (6 blocks,
48 px) to stay quick on two cores, the slow one runs the real ViT-B/16 geometry (12 blocks, 224 px).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import VIDEOS, need_shared
from stadapter.cli.main import app
from stadapter.errors import AdapterSetError, InputError
from stadapter.official import builtin_labels, import_official, infer_layout, read_checkpoint
from stadapter.recipes import preset
from stadapter.registry import open_registry
from stadapter.runtime.inputs import clip_views

runner = CliRunner()
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SMALL = "open_clip:ViT-B-16-quickgelu?image_size=48&layers=6"  # ViT-B/16 width and heads, 6 blocks, 3x3 patches
FULL = "open_clip:ViT-B-16-quickgelu"  # the real geometry: 12 blocks, 224 px, 14x14 patches
CLIP = "labelled/v_SoccerJuggling_g23_c01.avi"


# -- the reference: the official forward from the paper's equations and the official key names ------------

def layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def st_adapter(x, w, prefix, T):
    """Eq. 2 with f = identity (the official code): X + DWConv3D(X W_down) W_up on the patch tokens; the CLS
    token passes unchanged. The conv is depth-wise over (T, H, W) with zero padding k // 2."""
    BT, L, C = x.shape
    H = W = math.isqrt(L - 1)
    r = w[f"{prefix}.fc1.weight"].shape[0]
    k = w[f"{prefix}.conv.weight"].shape[2:]
    h = F.linear(x[:, 1:], w[f"{prefix}.fc1.weight"], w[f"{prefix}.fc1.bias"])
    h = h.view(BT // T, T, H, W, r).permute(0, 4, 1, 2, 3)
    h = F.conv3d(h, w[f"{prefix}.conv.weight"], w[f"{prefix}.conv.bias"], padding=tuple(n // 2 for n in k), groups=r)
    h = h.permute(0, 2, 3, 4, 1).reshape(BT, L - 1, r)
    return torch.cat([x[:, :1], x[:, 1:] + F.linear(h, w[f"{prefix}.fc2.weight"], w[f"{prefix}.fc2.bias"])], 1)


def attention(x, sd, p, heads):
    B, L, C = x.shape
    q, k, v = F.linear(x, sd[f"{p}.in_proj_weight"], sd[f"{p}.in_proj_bias"]).split(C, dim=-1)
    q, k, v = (t.view(B, L, heads, C // heads).transpose(1, 2) for t in (q, k, v))
    a = (q @ k.transpose(-1, -2) / math.sqrt(C // heads)).softmax(-1) @ v
    return F.linear(a.transpose(1, 2).reshape(B, L, C), sd[f"{p}.out_proj.weight"], sd[f"{p}.out_proj.bias"])


def official_logits(sd, w, clips, heads=12):
    """clips (B, 3, T, H, W), normalised -> logits: CLIP ViT (QuickGELU) with adapters before MHSA / the MLP
    where the checkpoint has them, frame-mean CLS -> ln_post -> (dropout: identity at test) -> fc."""
    B, _, T = clips.shape[:3]
    x = clips.permute(0, 2, 1, 3, 4).flatten(0, 1)
    patch = sd["conv1.weight"].shape[-1]
    x = F.conv2d(x, sd["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["positional_embedding"]
    x = layer_norm(x, sd, "ln_pre")
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(depth):
        p = f"transformer.resblocks.{i}"
        if f"{p}.adapter_pre_attn.fc1.weight" in w:
            x = st_adapter(x, w, f"{p}.adapter_pre_attn", T)
        x = x + attention(layer_norm(x, sd, f"{p}.ln_1"), sd, f"{p}.attn", heads)
        if f"{p}.adapter_pre_mlp.fc1.weight" in w:
            x = st_adapter(x, w, f"{p}.adapter_pre_mlp", T)
        h = F.linear(layer_norm(x, sd, f"{p}.ln_2"), sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
    cls = layer_norm(x[:, 0].reshape(B, T, -1).mean(1), sd, "ln_post")
    return F.linear(cls, w["fc.weight"], w["fc.bias"])


# -- files in the official layout ----------------------------------------------------------------------

def clip_weights(spec: str, path: Path) -> dict[str, torch.Tensor]:
    """A random-init CLIP vision tower saved as OpenAI's state dict would hold it (``visual.`` keys, ``proj``)."""
    from stadapter.model.backbone import BackboneSpec, build_architecture

    torch.manual_seed(7)
    visual = build_architecture(BackboneSpec.parse(spec)).visual
    sd = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    sd["positional_embedding"] += 0.2 * torch.randn_like(sd["positional_embedding"])  # frames differ more
    torch.save({**{f"visual.{k}": v for k, v in sd.items()}, "visual.proj": torch.randn(768, 512)}, path)
    return sd


def official_state(blocks: range, positions: tuple[str, ...], num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """The trainable tensors of models_adapter.VisionTransformer after training: non-zero everywhere."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (384, 768), "fc1.bias": (384,), "conv.weight": (384, 1, 3, 1, 1), "conv.bias": (384,),
              "fc2.weight": (768, 384), "fc2.bias": (768,)}
    scale = {"fc1.weight": 0.05, "fc1.bias": 0.1, "conv.weight": 0.5, "conv.bias": 0.1, "fc2.weight": 0.05,
             "fc2.bias": 0.05}
    out = {f"transformer.resblocks.{i}.adapter_pre_{p}.{n}": torch.randn(s, generator=g) * scale[n]
           for i in blocks for p in positions for n, s in shapes.items()}
    out["fc.weight"] = torch.randn(num_classes, 768, generator=g) * 0.5
    out["fc.bias"] = torch.randn(num_classes, generator=g) * 0.1
    return out


def training_checkpoint(model: dict[str, torch.Tensor], path: Path, epoch: int = 11) -> None:
    """``save_model`` of the official utils.py: model, AdamW state, LambdaLR, GradScaler, next_epoch."""
    params = [torch.nn.Parameter(t.clone()) for t in model.values()]
    opt = torch.optim.AdamW([{"params": params[:-1], "weight_decay": 0.01}, {"params": params[-1:],
                                                                           "weight_decay": 0.0}], lr=1e-3)
    sum((p * p).sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 17}
    torch.save({"model": model, "optimizer": opt.state_dict(), "lr_sched": sched.state_dict(),
                "loss_scaler": scaler, "next_epoch": epoch + 1}, path)


def reference_probs(sd, w, clip: Path, preset_name: str, size: int) -> torch.Tensor:
    spec = preset(preset_name).task
    (views,) = clip_views(clip, [spec], size, CLIP_MEAN, CLIP_STD)  # (V, T, 3, S, S)
    with torch.no_grad():
        return official_logits(sd, w, views.transpose(1, 2)).softmax(-1).mean(0)


def predicted(task: str, clip: Path, k: int) -> dict[str, float]:
    r = runner.invoke(app, ["predict", "--task", task, str(clip), "--top-k", str(k), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    (entry,) = json.loads(r.stdout)["results"][0]["tasks"]
    return {item["label"]: item["prob"] for item in entry["top"]}


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    weights = d / "clip_vit_b16_small.pt"
    return SMALL, weights, clip_weights(SMALL, weights)


LAYOUTS = [  # (preset, blocks, positions, labels from a file?)
    pytest.param("k400", range(0, 6), ("mlp",), False, id="k400-every-block-pre-mlp"),
    pytest.param("ssv2", range(0, 6), ("attn", "mlp"), False, id="ssv2-every-block-pre-attn-and-mlp"),
    pytest.param("ssv2", range(2, 6), ("attn", "mlp"), True, id="ssv2-last-4-blocks-own-labels"),
]


@pytest.mark.parametrize(("preset_name", "blocks", "positions", "own_labels"), LAYOUTS)
def test_import_gives_the_official_probabilities(home, tmp_path, small_clip, preset_name, blocks, positions,
                                                 own_labels):
    clip = need_shared(VIDEOS / CLIP)
    spec, weights, sd = small_clip
    n = 400 if preset_name == "k400" else 174
    model = official_state(blocks, positions, n if not own_labels else 7, seed=len(blocks))
    ckpt = tmp_path / "checkpoint-11.pth"
    training_checkpoint(model, ckpt)
    args = ["import-official", str(ckpt), "--task", "official", "--preset", preset_name, "--backbone", spec,
            "--weights", str(weights), "--json"]
    labels = builtin_labels(preset_name)
    if own_labels:
        labels = [f"action {i}" for i in range(7)]
        (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
        args += ["--labels", str(tmp_path / "labels.txt")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ref"] == "official:1"
    assert out["layout"].startswith(f"{len(blocks) * len(positions)}x384 (blocks {blocks[0]}-{blocks[-1]}")

    want = reference_probs(sd, model, clip, preset_name, 48)
    got = predicted("official", clip, len(labels))
    assert set(got) == set(labels)
    diff = max(abs(got[label] - float(p)) for label, p in zip(labels, want, strict=True))
    assert diff < 1e-4, diff
    # the comparison can fail: without its adapters the same backbone gives other probabilities
    bare = reference_probs(sd, {"fc.weight": model["fc.weight"], "fc.bias": model["fc.bias"]}, clip, preset_name, 48)
    assert float((bare - want).abs().max()) > 1e-3

    with open_registry() as reg:
        bundle = reg.load_bundle("official")
    assert bundle.spec == preset(preset_name).task  # the preset's sampling and test views
    assert bundle.adapter.last_k == (None if len(blocks) == 6 else 4) and bundle.adapter.activation == "none"
    reported = "The authors report 82.2% top-1" if preset_name == "k400" else "The authors report 66.9% top-1"
    assert (reported in bundle.extra["description"]) == (not own_labels)  # only the released layout claims it


def test_builtin_label_maps():
    k400, ssv2 = builtin_labels("k400"), builtin_labels("ssv2")
    assert (len(k400), len(set(k400)), len(ssv2), len(set(ssv2))) == (400, 400, 174, 174)
    assert (k400[0], k400[1], k400[-1]) == ("abseiling", "air drumming", "zumba")
    assert (ssv2[0], ssv2[32], ssv2[173]) == ("Approaching something with your camera",
                                              "Moving away from something with your camera",
                                              "Wiping something off of something")
    assert ssv2 == sorted(ssv2)  # labels.json indexes the templates in sorted order


# -- refusals -------------------------------------------------------------------------------------------

def _import(ckpt, small_clip, tmp_path, preset_name="k400", labels=None):
    spec, weights, _ = small_clip
    return import_official(ckpt, "x", preset_name, labels=labels, backbone=spec, weights=str(weights),
                           out=tmp_path / "out", register=False)


@pytest.fixture
def k400_state():
    return official_state(range(0, 6), ("mlp",), 400, seed=3)


def test_refuses_a_missing_key(tmp_path, small_clip, k400_state):
    del k400_state["transformer.resblocks.3.adapter_pre_mlp.conv.bias"]
    training_checkpoint(k400_state, tmp_path / "c.pth")
    with pytest.raises(AdapterSetError, match=r"^missing key transformer\.resblocks\.3\.adapter_pre_mlp\.conv\.bias"):
        _import(tmp_path / "c.pth", small_clip, tmp_path)
    assert not (tmp_path / "out").exists()


def test_refuses_an_extra_key(tmp_path, small_clip, k400_state):
    k400_state["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(2304, 768)
    torch.save(k400_state, tmp_path / "c.pth")  # a bare state dict
    with pytest.raises(AdapterSetError, match=r"^unexpected key transformer\.resblocks\.0\.attn\.in_proj_weight"):
        _import(tmp_path / "c.pth", small_clip, tmp_path)


def test_refuses_a_wrong_shape(tmp_path, small_clip, k400_state):
    k400_state["transformer.resblocks.5.adapter_pre_mlp.fc2.weight"] = torch.zeros(768, 192)
    training_checkpoint(k400_state, tmp_path / "c.pth")
    with pytest.raises(AdapterSetError, match=r"^transformer\.resblocks\.5\.adapter_pre_mlp\.fc2\.weight has shape "
                                              r"\(768, 192\), expected \(768, 384\)"):
        _import(tmp_path / "c.pth", small_clip, tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_refuses_a_pickled_object(tmp_path, small_clip, k400_state, capsys):
    torch.save({"model": k400_state, "args": Payload()}, tmp_path / "c.pth", pickle_module=pickle)
    with pytest.raises(InputError, match=r"is not a plain tensor file \(read with weights_only=True, no objects "
                                         r"unpickled\): Unsupported global: .*print"):
        _import(tmp_path / "c.pth", small_clip, tmp_path)
    assert "unpickled!" not in capsys.readouterr().out


def test_refuses_a_label_file_of_the_wrong_length(tmp_path, small_clip, k400_state, home):
    training_checkpoint(k400_state, tmp_path / "c.pth")
    (tmp_path / "labels.txt").write_text("\n".join(f"class {i}" for i in range(401)) + "\n")
    spec, weights, _ = small_clip
    r = runner.invoke(app, ["import-official", str(tmp_path / "c.pth"), "--task", "k400", "--preset", "k400",
                            "--labels", str(tmp_path / "labels.txt"), "--backbone", spec, "--weights", str(weights)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"error: label file {tmp_path / 'labels.txt'} has 401 class names, the checkpoint's head has 400 classes "
        f"(line 401 is one too many)"]


def test_refuses_the_other_preset_and_a_gelu_backbone(tmp_path, small_clip, k400_state):
    training_checkpoint(k400_state, tmp_path / "c.pth")
    with pytest.raises(AdapterSetError, match="the official ssv2 model has them attn[+]mlp"):
        _import(tmp_path / "c.pth", small_clip, tmp_path, preset_name="ssv2")
    layout = infer_layout(read_checkpoint(tmp_path / "c.pth"))
    assert (layout.positions, layout.blocks, layout.width, layout.kernel) == (("mlp",), tuple(range(6)), 384,
                                                                               (3, 1, 1))
    from stadapter.errors import BackboneError
    from stadapter.model.loading import load_backbone
    from stadapter.official.importer import check_official_backbone

    with pytest.raises(BackboneError, match="uses GELU in its MLPs"):
        check_official_backbone(load_backbone("open_clip:ViT-B-16?image_size=48&layers=6", "none"), layout)


def test_missing_task_names_the_ways_to_get_one(home, tmp_path):
    clip = need_shared(VIDEOS / CLIP)
    r = runner.invoke(app, ["predict", "--task", "k400", str(clip), "--device", "cpu"])
    assert r.exit_code == 1
    assert "no task 'k400'" in r.output and "stadapter import-official CHECKPOINT --task k400 --preset" in r.output
    assert "stadapter pull ORG/NAME" in r.output and "stadapter train" in r.output


@pytest.mark.slow
def test_full_vit_b16_24x384_import_gives_the_official_probabilities(home, tmp_path):
    """The released SSv2 layout on the real ViT-B/16 geometry (12 blocks, 224 px), random weights."""
    clip = need_shared(VIDEOS / CLIP)
    weights = tmp_path / "ViT-B-16.pt"
    sd = clip_weights(FULL, weights)
    model = official_state(range(12), ("attn", "mlp"), 174, seed=12)
    training_checkpoint(model, tmp_path / "checkpoint-49.pth", epoch=49)
    r = runner.invoke(app, ["import-official", str(tmp_path / "checkpoint-49.pth"), "--task", "ssv2", "--preset",
                            "ssv2", "--backbone", FULL, "--weights", str(weights)])
    assert r.exit_code == 0, r.output
    assert "registered ssv2:1: 24x384 (blocks 0-11, before MHSA and before the MLP)" in r.output
    want = reference_probs(sd, model, clip, "ssv2", 224)
    got = predicted("ssv2", clip, 174)
    labels = builtin_labels("ssv2")
    assert max(abs(got[label] - float(p)) for label, p in zip(labels, want, strict=True)) < 1e-4


def test_no_register_writes_a_checked_bundle_whose_card_names_the_source(tmp_path, small_clip, k400_state, home):
    from stadapter.bundle import Bundle
    from stadapter.model_card import render_card

    training_checkpoint(k400_state, tmp_path / "checkpoint-11.pth")
    spec, weights, _ = small_clip
    r = runner.invoke(app, ["import-official", str(tmp_path / "checkpoint-11.pth"), "--task", "k400", "--preset",
                            "k400", "--backbone", spec, "--weights", str(weights), "--no-register", "--out",
                            str(tmp_path / "bundle")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {tmp_path / 'bundle'}: 6x384 (blocks 0-5, before the MLP)")
    bundle = Bundle.load(tmp_path / "bundle")  # the full check of a bundle directory
    assert bundle.labels == builtin_labels("k400") and bundle.spec == preset("k400").task
    card = render_card(bundle)
    assert "linziyi96/st-adapter" in card and "82.2% top-1" in card and "checkpoint-11.pth" in card
    from stadapter.errors import RegistryError

    with open_registry() as reg, pytest.raises(RegistryError, match="no task 'k400'"):
        reg.resolve("k400")  # not registered
    r = runner.invoke(app, ["import-official", str(tmp_path / "checkpoint-11.pth"), "--task", "k400", "--preset",
                            "k400", "--no-register"])
    assert r.exit_code == 1 and "pass --out DIR" in r.output
