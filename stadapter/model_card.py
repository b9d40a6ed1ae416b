"""The bundle's README.md as a Hugging Face model card: Hub YAML metadata, then what a user needs to know.

    ---
    library_name: stadapter
    pipeline_tag: video-classification
    tags: [stadapter, st-adapter, video-classification, action-recognition, ...]
    base_model: openai/clip-vit-base-patch16       (when the backbone's pretrained weights are on the Hub)
    datasets: [...]                                (when the bundle names them)
    metrics: [accuracy]
    model-index: [...top-1 / top-5...]              (when the bundle has metrics)
    stadapter: {task, version, backbone spec / weights / fingerprint, ...}
    ---
    # title, labels, frames and views, sampling, the recipe, trainable parameters, how to pull and predict

The card is a pure function of the bundle (no dates), so pushing the same bundle twice gives the same bytes.
It never publishes a local filesystem path: a backbone loaded from a local weights file is named by its spec, the
file's name and its fingerprint (:func:`public_weights`), and data paths by their file names (:func:`public`).
The bundle's figures (``curves.png``, ``confusion.png``) are shown in it, linked relative to the repository.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import yaml

from stadapter import __version__
from stadapter.bundle import FORMAT_VERSION, Bundle
from stadapter.model.weights_index import LOCAL_PREFIX

BASE_TAGS = ["stadapter", "st-adapter", "video-classification", "action-recognition"]

# Pretrained backbones whose weights live in a Hub repo: (library, model name, weights tag) -> repo id.
HUB_BACKBONES = {
    ("open_clip", "ViT-B-16", "openai"): "openai/clip-vit-base-patch16",
    ("open_clip", "ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
    ("open_clip", "ViT-L-14", "openai"): "openai/clip-vit-large-patch14",
    ("open_clip", "ViT-L-14-336", "openai"): "openai/clip-vit-large-patch14-336",
    ("open_clip", "ViT-B-16", "laion2b_s34b_b88k"): "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    ("open_clip", "ViT-L-14", "laion2b_s32b_b82k"): "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
    ("open_clip", "ViT-H-14", "laion2b_s32b_b79k"): "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
}

_TOP1 = {"top1", "top1acc", "top1accuracy", "acc1", "accuracy", "acc"}
_TOP5 = {"top5", "top5acc", "top5accuracy", "acc5"}


def base_model_id(backbone: dict[str, Any]) -> str | None:
    """The Hub repo of the backbone's pretrained weights, or None (random init, local files, unknown)."""
    spec, weights = str(backbone.get("spec") or ""), backbone.get("weights")
    lib, _, rest = spec.partition(":")
    if not weights or weights == "none" or "?" in rest:
        return None
    if lib == "timm" and weights == "pretrained":
        return f"timm/{rest}" if "." in rest else None  # timm hosts tagged models as timm/NAME.TAG
    return HUB_BACKBONES.get((lib, rest, str(weights)))


WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz", ".pkl")
FIGURES = {"curves.png": "Training curves (loss, learning rate, validation accuracy)",
           "confusion.png": "Validation confusion matrix (rows: true class, columns: predicted)"}


def _is_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(WEIGHT_FILE_SUFFIXES)


def _file_name(text: str) -> str:
    return PureWindowsPath(PurePosixPath(text).name).name


def public_weights(weights: Any) -> str | None:
    """The backbone's weights as the card names them: a pretrained tag as it is, a local file as
    ``local file NAME`` (never its folder)."""
    if weights is None:
        return None
    text = str(weights)
    if text.startswith(LOCAL_PREFIX):
        text = text[len(LOCAL_PREFIX):]
    elif not _is_path(text):
        return text
    return f"local file {_file_name(text)}"


def public(value: Any) -> Any:
    """``value`` with every string that looks like a filesystem path cut to its file name (dicts and lists
    walked)."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public(v) for v in value]
    if isinstance(value, str) and _is_path(value):
        return _file_name(value)
    return value


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d):
        out[prefix[:-1]] = d
    return out


def _test_then_val(item: tuple[str, Any]) -> tuple[int, str]:
    """Sort key of a (metric key, value) pair: test metrics first, then validation, then the rest, by key."""
    key = item[0]
    return (0 if "test" in key else 1 if "val" in key else 2), key


def top_k(metrics: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(top-1, top-5) accuracy in percent from a metrics dict (flat or nested, e.g. under "test"/"val"; keys
    like top1, top1_acc, acc1, accuracy). Fractions (all values <= 1) are scaled to percent."""
    flat = _flatten(metrics or {})

    def find(names: set[str]) -> float | None:
        hits = [(k, v) for k, v in flat.items() if _norm(k.rsplit(".", 1)[-1]) in names
                and "err" not in _norm(k.rsplit(".", 1)[-1])]
        if not hits:
            return None
        return float(min(hits, key=_test_then_val)[1])

    top1, top5 = find(_TOP1), find(_TOP5)
    values = [v for v in (top1, top5) if v is not None]
    if values and all(0.0 <= v <= 1.0 for v in values):
        top1, top5 = (None if v is None else v * 100.0 for v in (top1, top5))
    return (None if top1 is None else round(top1, 2)), (None if top5 is None else round(top5, 2))


def datasets_of(bundle: Bundle) -> list[str]:
    """Dataset ids the bundle names in its config extra: ``datasets`` (list), ``dataset`` (str) or
    ``data.dataset`` / ``data.name``."""
    extra = bundle.extra or {}
    if isinstance(extra.get("datasets"), list):
        return [str(d) for d in extra["datasets"] if d]
    if isinstance(extra.get("dataset"), str) and extra["dataset"]:
        return [extra["dataset"]]
    data = extra.get("data")
    if isinstance(data, dict):
        for key in ("dataset", "name"):
            if isinstance(data.get(key), str) and data[key]:
                return [data[key]]
    return []


def trainable_parameters(bundle: Bundle) -> dict[str, int]:
    """Parameter counts of the bundle's tensors: adapters, head, backbone replacements, total."""
    counts = {"adapters": 0, "head": 0, "backbone": 0}
    for key, t in bundle.tensors.items():
        part = "adapters" if key.startswith("adapters.") else "head" if key.startswith("head.") else "backbone"
        counts[part] += int(t.numel())
    counts["total"] = sum(counts.values())
    return counts


def card_metadata(bundle: Bundle, *, repo: str | None = None, version: int | None = None) -> dict[str, Any]:
    """The YAML front matter as a dict (see the module docstring)."""
    backbone = bundle.backbone or {}
    spec = str(backbone.get("spec") or "")
    tags = list(BASE_TAGS)
    for extra_tag in (bundle.adapter.method, spec.partition(":")[0], bundle.task):
        if extra_tag and extra_tag not in tags:
            tags.append(extra_tag)
    meta: dict[str, Any] = {"library_name": "stadapter", "pipeline_tag": "video-classification", "tags": tags}
    if isinstance(bundle.extra.get("license"), str):
        meta["license"] = bundle.extra["license"]
    base = base_model_id(backbone)
    if base:
        meta["base_model"] = base
    datasets = datasets_of(bundle)
    if datasets:
        meta["datasets"] = datasets
    top1, top5 = top_k(bundle.metrics)
    if top1 is not None or top5 is not None:
        meta["metrics"] = ["accuracy"]
        results = []
        if top1 is not None:
            results.append({"type": "accuracy", "name": "Top-1 accuracy", "value": top1})
        if top5 is not None:
            results.append({"type": "top_5_accuracy", "name": "Top-5 accuracy", "value": top5})
        dataset = datasets[0] if datasets else bundle.task
        split = (bundle.metrics or {}).get("split") if isinstance((bundle.metrics or {}).get("split"), str) else None
        ds: dict[str, Any] = {"name": dataset, "type": dataset}
        if split:
            ds["split"] = split
        meta["model-index"] = [{
            "name": repo or bundle.task,
            "results": [{"task": {"type": "video-classification", "name": "Video Classification"},
                         "dataset": ds, "metrics": results}],
        }]
    info: dict[str, Any] = {"task": bundle.task}
    if version is not None:
        info["version"] = version
    info |= {"format_version": FORMAT_VERSION, "method": bundle.adapter.method, "num_classes":
             bundle.adapter.num_classes, "num_frames": bundle.spec.num_frames, "backbone": spec,
             "backbone_weights": public_weights(backbone.get("weights")),
             "backbone_fingerprint": backbone.get("fingerprint")}
    meta["stadapter"] = info
    return meta


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_card(bundle: Bundle, *, repo: str | None = None, version: int | None = None,
                revision: str | None = None) -> str:
    """The full README.md for ``bundle``, to be pushed as ``repo`` (ORG/NAME) at ``revision`` (default
    ``v{version}``)."""
    meta = card_metadata(bundle, repo=repo, version=version)
    backbone = bundle.backbone or {}
    revision = revision or (f"v{version}" if version is not None else None)
    front = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100).rstrip(), "---", ""]
    sections = [front, _intro_section(bundle, version, backbone), _results_section(bundle),
                _usage_section(bundle, repo or "ORG/NAME", revision), _input_section(bundle, backbone),
                _adapter_section(bundle, backbone), _recipe_section(bundle), _figures_section(bundle),
                _labels_section(bundle), _files_section(bundle)]
    return "\n".join(line for section in sections for line in section)


def _intro_section(bundle: Bundle, version: int | None, backbone: dict[str, Any]) -> list[str]:
    a = bundle.adapter
    title = f"{bundle.task}" + (f" v{version}" if version is not None else "")
    lines = [f"# {title}: ST-Adapter video classifier", ""]
    lines += [f"An adapter bundle for stadapter: {a.num_classes} classes, "
              f"method `{a.method}` on the frozen backbone `{backbone.get('spec')}` "
              f"(weights `{public_weights(backbone.get('weights'))}`, fingerprint `{backbone.get('fingerprint')}`). "
              f"Only the adapters and the head were trained; the backbone "
              f"is shared by every task and is not part of this repository.", ""]
    desc = bundle.extra.get("description")
    if isinstance(desc, str) and desc.strip():
        lines += [desc.strip(), ""]
    return lines


def _results_section(bundle: Bundle) -> list[str]:
    top1, top5 = top_k(bundle.metrics)
    if top1 is None and top5 is None:
        return []
    lines = ["## Results", "", "| metric | value |", "|---|---|"]
    if top1 is not None:
        lines.append(f"| top-1 accuracy | {top1:.2f}% |")
    if top5 is not None:
        lines.append(f"| top-5 accuracy | {top5:.2f}% |")
    s = bundle.spec
    return lines + ["", f"Views at test time: {s.temporal_views} temporal x {s.spatial_views} spatial.", ""]


def _usage_section(bundle: Bundle, name: str, revision: str | None) -> list[str]:
    ref = f"{name}@{revision}" if revision else name
    return ["## How to use", "", "```bash", "pip install stadapter", f"stadapter pull {ref}",
            f"stadapter predict --task {bundle.task} clip.mp4", "```", "",
            "`stadapter pull` resolves the revision to one commit, checks every file against `manifest.json` "
            "(sha256 and size), refuses pickles and unlisted files, and registers the bundle as a new version "
            f"of task `{bundle.task}` (`--task NAME` picks another name). In Python:", "",
            "```python", "from stadapter.hub import pull", "from stadapter.bundle import Bundle", "",
            f"result = pull({name!r}, {revision or 'main'!r}, dest=\"bundle\")",
            "bundle = Bundle.load(result.path)  # verified again on load", "```", ""]


def _input_section(bundle: Bundle, backbone: dict[str, Any]) -> list[str]:
    s = bundle.spec
    lines = ["## Input: frames and views", "", "| setting | value |", "|---|---|",
             f"| frames per view | {s.num_frames} |",
             f"| sampling | {s.sampling}" + (f", stride {s.frame_stride}" if s.sampling == "dense" else
                                             " (one frame per segment; random in training, centre at test)") + " |",
             f"| test views | {s.temporal_views} temporal x {s.spatial_views} spatial |",
             f"| training crop | {s.train_crop}, scale {s.scale_range[0]:g}-{s.scale_range[1]:g} |",
             f"| horizontal flip | {'yes' if s.flip else 'no'}"
             + (" (direction-sensitive labels)" if s.direction_sensitive else "") + " |",
             f"| RandAugment | {s.rand_augment or 'none'} |"]
    if backbone.get("image_size"):
        size = backbone["image_size"]
        lines.append(f"| frame size | {size[0]} x {size[1]} |")
    if backbone.get("mean") and backbone.get("std"):
        lines.append(f"| normalisation | mean {_fmt(backbone['mean'])}, std {_fmt(backbone['std'])} |")
    return lines + [""]


def _adapter_section(bundle: Bundle, backbone: dict[str, Any]) -> list[str]:
    a = bundle.adapter
    params = trainable_parameters(bundle)
    lines = ["## Adapters and trainable parameters", "", "| setting | value |", "|---|---|",
             f"| method | {a.method} |"]
    if a.has_adapters:
        lines += [f"| bottleneck width r | {a.width} |",
                  f"| positions | {', '.join(a.positions)} (before each branch) |",
                  f"| blocks | {'all' if a.last_k is None else f'last {a.last_k}'} |",
                  f"| activation | {a.activation} |"]
        if a.method == "st-adapter":
            lines.append(f"| depthwise conv kernel | {' x '.join(str(k) for k in a.kernel)} (T x H x W) |")
    return lines + [
        f"| pooling | {a.pool} |", f"| head dropout | {a.dropout:g} |",
        f"| trainable parameters | {params['total']:,} (adapters {params['adapters']:,}, head "
        f"{params['head']:,}" + (f", backbone copies {params['backbone']:,}" if params["backbone"] else "") + ") |",
        f"| backbone fingerprint | `{backbone.get('fingerprint')}` |", ""]


def _recipe_section(bundle: Bundle) -> list[str]:
    recipe = bundle.extra.get("recipe")
    train = bundle.extra.get("train")
    if not (recipe or train):
        return []
    lines = ["## Training recipe", ""]
    if isinstance(recipe, str):
        lines += [f"Preset: `{recipe}`.", ""]
    if isinstance(train, dict) and train:
        lines += ["```json", json.dumps(train, indent=1, sort_keys=True), "```", ""]
    data = public(bundle.extra.get("data"))
    if data:
        lines += [f"Data: {data if isinstance(data, str) else json.dumps(data, sort_keys=True)}", ""]
    return lines


def _figures_section(bundle: Bundle) -> list[str]:
    """The bundle's figures, shown from the repository's own files (relative links)."""
    names = [n for n in FIGURES if n in bundle.figures] + sorted(n for n in bundle.figures if n not in FIGURES)
    if not names:
        return []
    lines = ["## Training figures", ""]
    for name in names:
        caption = FIGURES.get(name, name)
        lines += [f"{caption}:", "", f"![{caption}]({name})", ""]
    return lines


def _labels_section(bundle: Bundle) -> list[str]:
    n = len(bundle.labels)
    return ([f"## Labels ({n})", "", "<details>", f"<summary>{n} classes, in head order</summary>", "",
             "| index | label |", "|---|---|"]
            + [f"| {i} | {_cell(label)} |" for i, label in enumerate(bundle.labels)]
            + ["", "</details>", ""])


def _files_section(bundle: Bundle) -> list[str]:
    return ["## Files", "", "`adapter.safetensors` (adapter and head tensors; safetensors only), `config.json` "
            "(adapter config, task spec, backbone), `labels.json`, `README.md`"
            + (", `metrics.json`" if bundle.metrics is not None else "")
            + "".join(f", `{name}`" for name in sorted(bundle.figures))
            + ", and `manifest.json` (sha256 and size of every other file, bundle format "
            f"version {FORMAT_VERSION}).", "",
            f"Written by stadapter {__version__}. ST-Adapter: Pan, Lin et al., *ST-Adapter: Parameter-Efficient "
            "Image-to-Video Transfer Learning*, NeurIPS 2022.", ""]


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def parse_card(text: str) -> tuple[dict[str, Any], str]:
    """(front matter as a dict, body) of a model card; ({}, text) without front matter. Uses safe_load."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("model card front matter is not closed by '---'")
    meta = yaml.safe_load(text[4:end]) or {}
    if not isinstance(meta, dict):
        raise ValueError("model card front matter is not a mapping")
    return meta, text[end + 5:]


__all__ = ["base_model_id", "card_metadata", "datasets_of", "parse_card", "public", "public_weights",
           "render_card", "top_k", "trainable_parameters"]
