"""The bundle format's one owner: strict manifests, config + labels parsing, the safetensors header reader, and
the atomic directory publish. Every refusal is checked where a bundle enters: verification (load, import) and
registration, which must refuse before any blob is written or any version number is taken."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stadapter.bundle import (
    CONFIG,
    LABELS,
    MANIFEST,
    TENSORS,
    Bundle,
    BundleConfig,
    check_content,
    parse_config,
    read_config,
    read_safetensors_header,
    verify_bundle,
    write_manifest,
)
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.errors import BundleError
from stadapter.fsio import publish_dir, publish_file, sha256_file
from stadapter.runtime.pool import read_header
from test_registry_support import assert_all_rows_intact, make_bundle

pytest_plugins = ["test_registry_support"]  # fixtures: reg (SQLite and PostgreSQL)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


def _list_in_manifest(bundle: Path, name: str, file: Path) -> None:
    """Add ``name`` to the manifest with the true sha256 and size of ``file``: only the name can be wrong."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": sha256_file(file), "size": file.stat().st_size}
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _outside_parent(bundle: Path) -> None:
    (bundle.parent / "x.png").write_bytes(PNG)
    _list_in_manifest(bundle, "../x.png", bundle.parent / "x.png")


def _absolute(bundle: Path) -> None:
    (bundle.parent / "x.png").write_bytes(PNG)
    _list_in_manifest(bundle, str((bundle.parent / "x.png").resolve()), bundle.parent / "x.png")


def _hidden(bundle: Path) -> None:
    (bundle / ".x.png").write_bytes(PNG)
    _list_in_manifest(bundle, ".x.png", bundle / ".x.png")


def _size_as_text(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][LABELS]["size"] = str(manifest["files"][LABELS]["size"])
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _other_version(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["format_version"] = 2
    (bundle / MANIFEST).write_text(json.dumps(manifest))


BAD_MANIFESTS = {
    "parent": (_outside_parent, r"unsafe file name\(s\) \.\./x\.png"),
    "absolute": (_absolute, r"unsafe file name\(s\) /.*x\.png"),
    "hidden": (_hidden, r"unsafe file name\(s\) \.x\.png"),
    "size-as-text": (_size_as_text, r"does not give a sha256 and a size in bytes for labels\.json"),
    "format-version": (_other_version, r"format version 2; this stadapter .* reads version 1"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_refused_by_verification(tmp_path, case):
    spoil, message = BAD_MANIFESTS[case]
    bundle = make_bundle(tmp_path / "b")
    spoil(bundle)
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match=message):
        Bundle.load(bundle)


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_refused_by_register(reg, tmp_path, case):
    spoil, message = BAD_MANIFESTS[case]
    first = reg.register(make_bundle(tmp_path / "good", task="demo"))
    blobs = set(reg.blobs.blobs())
    bundle = make_bundle(tmp_path / "bad", task="demo", seed=1)
    spoil(bundle)
    with pytest.raises(BundleError, match=message):
        reg.register(bundle)
    assert set(reg.blobs.blobs()) == blobs  # nothing was published
    assert [v.version for v in reg.list_versions("demo")] == [1]
    assert reg.resolve("demo:1") == first
    assert assert_all_rows_intact(reg, tmp_path / "scratch") == {"demo": [1]}


def _rewrite(bundle: Path, name: str, payload: object) -> None:
    """Replace one JSON file and list it honestly in the manifest, so only its content is wrong."""
    (bundle / name).write_text(json.dumps(payload))
    write_manifest(bundle)


def _config(bundle: Path) -> dict:
    return json.loads((bundle / CONFIG).read_text())


def _no_adapter(bundle: Path) -> None:
    config = _config(bundle)
    del config["adapter"]
    _rewrite(bundle, CONFIG, config)


def _classes_as_text(bundle: Path) -> None:
    config = _config(bundle)
    config["adapter"]["num_classes"] = "3"
    _rewrite(bundle, CONFIG, config)


BAD_CONFIGS = {
    "no-adapter": (_no_adapter, r"config\.json has no 'adapter' section"),
    "classes-as-text": (_classes_as_text, r"config\.json: 'adapter': num_classes must be a positive integer"),
    "label-count": (lambda b: _rewrite(b, LABELS, ["a", "b"]), r"2 labels for a head of 3 classes"),
    "repeated-labels": (lambda b: _rewrite(b, LABELS, ["a", "b", "a"]), r"class names repeat: a"),
    "no-fingerprint": (lambda b: _rewrite(b, CONFIG, {**_config(b), "backbone": {"spec": "tiny"}}),
                       r"names no backbone fingerprint"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_refused_before_a_version_number_is_taken(reg, tmp_path, case):
    spoil, message = BAD_CONFIGS[case]
    reg.register(make_bundle(tmp_path / "first", task="demo"))
    blobs = set(reg.blobs.blobs())
    bundle = make_bundle(tmp_path / "bad", task="demo", seed=1)
    spoil(bundle)
    verify_bundle(bundle)  # the files match their manifest: only the content is wrong
    with pytest.raises(BundleError, match=message) as refused:
        reg.register(bundle)
    assert str(bundle) in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(BundleError, match=message):
        Bundle.load(bundle)  # loading refuses it the same way
    assert set(reg.blobs.blobs()) == blobs
    assert reg.register(make_bundle(tmp_path / "next", task="demo", seed=2)).version == 2


def test_parse_config_returns_typed_values(tmp_path):
    bundle = make_bundle(tmp_path / "b", task="k400", extra_note="x")
    parsed = read_config(bundle)
    assert isinstance(parsed, BundleConfig) and isinstance(parsed.adapter, AdapterConfig)
    assert parsed.task == "k400" and parsed.labels == ("class0", "class1", "class2")
    assert parsed.fingerprint == "fp-a" and parsed.extra == {"extra_note": "x"}
    assert parsed.adapter.num_classes == 3 and parsed.spec.num_frames > 0
    config = _config(bundle)
    with pytest.raises(BundleError, match=r"^k400:1: config\.json: 'spec' must be a JSON object$"):
        parse_config({**config, "spec": []}, list(parsed.labels), "k400:1")
    with pytest.raises(BundleError, match=r"labels\.json must be a list of class names"):
        parse_config(config, "class0", "k400:1")
    with pytest.raises(BundleError, match=r"config\.json has format version 0"):
        parse_config({**config, "format_version": 0}, list(parsed.labels), "k400:1")


# -- the safetensors header reader ------------------------------------------------------------------------

def _tensors_file(tmp_path: Path) -> Path:
    path = tmp_path / TENSORS
    save_file({"a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.int64)},
              str(path))
    return path


def test_header_reader_reads_a_real_file(tmp_path):
    path = _tensors_file(tmp_path)
    header = read_safetensors_header(path)
    assert header.entries["a"].dtype == "F32" and header.entries["a"].shape == (3, 4)
    assert header.data_offset + max(e.end for e in header.entries.values()) == path.stat().st_size
    offset, entries = read_header(path)  # the pool's view of the same header, with torch dtypes
    assert offset == header.data_offset and entries["b"].dtype == torch.int64


def test_header_claiming_a_terabyte_is_refused(tmp_path):
    path = tmp_path / TENSORS
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    for read in (read_safetensors_header, read_header):
        with pytest.raises(BundleError, match=r"header of 1099511627776 bytes is implausible"):
            read(path)
    with pytest.raises(BundleError, match=f"refusing {TENSORS}: not a safetensors file"):
        check_content(path, TENSORS, "org/demo@main")


@pytest.mark.parametrize("cut,message", [(4, "too short"), (20, "runs past the end of the file"),
                                         (-3, "tensor data is truncated")])
def test_truncated_file_is_refused(tmp_path, cut, message):
    path = _tensors_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    for read in (read_safetensors_header, read_header):
        with pytest.raises(BundleError, match=message):
            read(path)
    with pytest.raises(BundleError, match=f"refusing {TENSORS}: not a safetensors file.*{message}"):
        check_content(path, TENSORS, "org/demo@main")


def test_header_entries_must_fit_dtype_and_shape(tmp_path):
    path = tmp_path / TENSORS
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    with pytest.raises(BundleError, match=r"'w': 12 bytes for shape \[2, 2\] of F32"):
        read_safetensors_header(path)


# -- publishing a directory atomically ----------------------------------------------------------------------

def test_publish_dir_renames_a_complete_directory(tmp_path):
    dest = tmp_path / "out" / "bundle"
    publish_dir(dest, lambda staging: (staging / "a.txt").write_text("a"))
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"] and (dest / "a.txt").read_text() == "a"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle"]  # no staging directory left
    empty = tmp_path / "empty"
    empty.mkdir()
    publish_dir(empty, lambda staging: (staging / "b.txt").write_text("b"))  # an empty target is replaced
    assert [p.name for p in empty.iterdir()] == ["b.txt"]


def test_publish_dir_leaves_nothing_when_the_writer_raises(tmp_path):
    dest = tmp_path / "bundle"
    seen: list[Path] = []

    def write_then_fail(staging: Path) -> None:
        seen.append(staging)
        (staging / "half.bin").write_bytes(os.urandom(64))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        publish_dir(dest, write_then_fail)
    assert seen and seen[0].parent == tmp_path and seen[0].name.startswith(".bundle.")
    assert list(tmp_path.iterdir()) == []  # neither the staging directory nor a partial destination
    # Bundle.save failing half-way (metrics that are not JSON, written after the tensors): the same.
    bundle = Bundle(task="t", adapter=AdapterConfig(num_classes=1, width=4), spec=TaskSpec(),
                    backbone={"fingerprint": "fp"}, labels=["a"], tensors={"head.bias": torch.zeros(1)},
                    metrics={"top1": object()})
    with pytest.raises(TypeError):
        bundle.save(dest)
    assert list(tmp_path.iterdir()) == []


def test_publish_dir_keeps_a_directory_built_meanwhile_only_when_asked(tmp_path):
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "theirs.txt").write_text("built by another process")
    with pytest.raises(OSError):
        publish_dir(dest, lambda staging: (staging / "mine.txt").write_text("mine"))
    publish_dir(dest, lambda staging: (staging / "mine.txt").write_text("mine"),
                keep_existing=lambda built: (built / "theirs.txt").is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert [p.name for p in dest.iterdir()] == ["theirs.txt"]


def test_publish_file_replaces_atomically_and_leaves_nothing_when_the_writer_raises(tmp_path):
    dest = tmp_path / "ref"
    dest.write_text("old")

    def broken(out) -> None:
        out.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        publish_file(dest, broken)
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ref"]
    publish_file(dest, lambda out: out.write(b"new"), prefix=".tmp-", mode=0o444)
    assert dest.read_text() == "new" and (dest.stat().st_mode & 0o777) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]
