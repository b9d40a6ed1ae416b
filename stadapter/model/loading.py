"""Build a frozen backbone with its weights: ``none`` (seeded random init), a local file, or a pretrained tag.

The only place model weights are read from disk or the network. Nothing downloads unless a pretrained tag was
asked for, and without a network that fails within seconds with a message naming the local-file option.

A backbone loaded from a local file is named ``file:NAME`` (its ``weights``, which bundles store beside the
fingerprint): never the file's directory, which is this machine's business. ``load_backbone`` finds such a file
again through :mod:`stadapter.model.weights_index`; when it cannot, the error says to pass ``--weights PATH``
and which fingerprint the file must have.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

from stadapter.errors import BackboneError
from stadapter.model import weights_index
from stadapter.model.backbone import Backbone, BackboneSpec, TimmBackbone, build_architecture, build_open_clip
from stadapter.model.weights_index import LOCAL_PREFIX

RANDOM_INIT_SEED = 0  # weights "none" are reproducible, so their fingerprint pins bundles across processes
DEFAULT_WEIGHTS = {"open_clip": "openai", "timm": "pretrained"}
PROBE_TIMEOUT_S = 3.0


def load_backbone(spec: str | BackboneSpec, weights: str | None = None, fingerprint: str | None = None) -> Backbone:
    """A frozen, eval-mode backbone on the CPU in fp32.

    weights: ``none`` for a random init (seed 0, so every process builds the same weights), a path to a
    ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` state dict, ``file:NAME`` (a file loaded before on this
    machine, as bundles name it), or a pretrained tag (open_clip: ``openai``, ``laion2b_s34b_b88k``, ...; timm:
    ``pretrained``). Default: the library's pretrained weights.

    fingerprint: the fingerprint a bundle says these weights have (when ``weights`` comes from a bundle): a
    missing file is then looked up by it, and the error names it. The caller still checks the result.
    """
    spec = spec if isinstance(spec, BackboneSpec) else BackboneSpec.parse(spec)
    weights = DEFAULT_WEIGHTS[spec.library] if weights is None else weights
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            backbone = build_architecture(spec)
    elif is_local(weights):
        path = locate_weights(spec, weights, fingerprint)
        backbone = _from_file(spec, path)
        if fingerprint is not None and path != Path(weights).expanduser() and backbone.fingerprint() != fingerprint:
            raise BackboneError(f"{path}, which {weights_index.index_path()} lists for {weights}, now holds weights "
                                f"of fingerprint {backbone.fingerprint()}, not {fingerprint}: pass --weights PATH "
                                f"to the right file")
        weights = LOCAL_PREFIX + path.name
        weights_index.remember(backbone.fingerprint(), path)
    else:
        backbone = _from_tag(spec, weights)
    backbone.weights = weights
    backbone.fingerprint()  # in fp32, before any cast to half precision
    return backbone.freeze()


def is_local(weights: str) -> bool:
    """Whether ``weights`` names a local file (a path, or ``file:NAME``) rather than ``none`` or a tag."""
    return weights.startswith(LOCAL_PREFIX) or os.sep in weights or \
        weights.endswith((".safetensors", ".bin", ".pt", ".pth")) or Path(weights).exists()


def locate_weights(spec: BackboneSpec, weights: str, fingerprint: str | None = None) -> Path:
    """The local file ``weights`` names: the path itself when it is a file; else (a ``file:NAME`` or a moved
    file) the file last loaded with ``fingerprint`` (or, without one, called NAME) on this machine."""
    if not weights.startswith(LOCAL_PREFIX):
        path = Path(weights).expanduser()
        if path.is_file() or fingerprint is None:
            return path  # _from_file says "does not exist" when it is not there
        name = path.name
    else:
        name = weights[len(LOCAL_PREFIX):]
    found = weights_index.lookup(fingerprint, name)
    if found is not None:
        return found
    where = f"weights file {weights} does not exist" if not weights.startswith(LOCAL_PREFIX) else \
        f"no local weights file {name!r} is known on this machine"
    check = f"its fingerprint must be {fingerprint}" if fingerprint else "its fingerprint will be checked"
    raise BackboneError(f"{where} (backbone {spec} was loaded from that file when the task was trained): pass "
                        f"--weights PATH to the file; {check}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a plain torch file (never unpickles arbitrary objects)."""
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure is the file's fault
        raise BackboneError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path} does not hold a state dict")
    return state


def _mismatch_message(spec: BackboneSpec, path: Path, err: Exception) -> str:
    text = str(err).replace("\n", " ").replace("\t", "")
    if len(text) > 400:
        text = text[:400] + "..."
    return f"weights file {path} does not fit backbone {spec}: {text}"


def _from_file(spec: BackboneSpec, path: Path) -> Backbone:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    if spec.library == "timm":
        import timm

        opts = dict(spec.options)
        try:
            vit = timm.create_model(spec.name, pretrained=True, num_classes=0,
                                    pretrained_cfg_overlay=dict(file=str(path)), **opts)
        except RuntimeError as e:
            raise BackboneError(_mismatch_message(spec, path, e)) from e
        except Exception as e:  # reported as the file's fault, with the cause
            raise BackboneError(f"cannot load weights file {path} into {spec}: {type(e).__name__}: {e}") from e
        return TimmBackbone(spec, vit)
    backbone = build_open_clip(spec)
    state = read_state_dict(path)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    state.pop("proj", None)  # CLIP's projection is not used
    try:
        backbone.visual.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BackboneError(_mismatch_message(spec, path, e)) from e
    return backbone


def _endpoint_reachable() -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _from_tag(spec: BackboneSpec, tag: str) -> Backbone:
    hint = "pass --weights /path/to/weights.safetensors (a local file), or --weights none for a random init"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not _endpoint_reachable():
        offline = True
    if spec.library == "open_clip":
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        if tag not in tags:
            raise BackboneError(f"open_clip has no pretrained weights {tag!r} for {spec.name} "
                                f"(known: {', '.join(tags) or 'none'}); {hint}")
        if spec.options:
            raise BackboneError(f"pretrained weights {tag!r} fit {spec.name} only without options; {hint}")
    elif tag != "pretrained":
        raise BackboneError(f"timm weights are 'pretrained' (with the tag in the model name, e.g. "
                            f"timm:vit_base_patch16_224.augreg_in21k), got {tag!r}; {hint}")
    import huggingface_hub.constants as hf_constants

    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = offline or saved
    try:
        with _quiet_root_logger():
            if spec.library == "open_clip":
                model = open_clip.create_model(spec.name, pretrained=tag, require_pretrained=True)
                from stadapter.model.backbone import OpenClipBackbone

                return OpenClipBackbone(spec, model.visual)
            import timm

            from stadapter.model.backbone import TimmBackbone

            return TimmBackbone(spec, timm.create_model(spec.name, pretrained=True, num_classes=0,
                                                        **dict(spec.options)))
    except Exception as e:  # download failures come in many types
        why = "no network (and not in the local cache)" if offline else f"{type(e).__name__}: {e}"
        raise BackboneError(f"cannot get pretrained weights {tag!r} for {spec}: {why}; {hint}") from e
    finally:
        hf_constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Drop ERROR records the model libraries write to the root logger while they load (open_clip logs
    "Failed to download weights ..." through ``logging.error``, which also installs a stderr handler): the
    failure reaches the user once, as our BackboneError."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()  # else logging.error() calls basicConfig()
    if guard is not None:
        root.addHandler(guard)
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        if guard is not None:
            root.removeHandler(guard)
