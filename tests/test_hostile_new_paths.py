"""Hostile input on the paths of the official import, fetch on miss, listings, list files and the weights index:
each is refused with one line (never a traceback), loads nothing wrong silently and loses nothing stored."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from hub_fixtures import TOKEN, hub, hub_factory, make_bundle, online  # noqa: F401 - fixtures
from stadapter.cli.main import app
from stadapter.errors import BackboneError, RegistryError
from stadapter.model import weights_index
from stadapter.model.loading import load_backbone
from stadapter.official import read_checkpoint
from stadapter.official.presets import read_label_file
from stadapter.registry import open_registry
from stadapter.registry.api import check_name, parse_ref
from stadapter.registry.queries import Filters
from stadapter.registry.remote import ENV
from stadapter.video.datasets import parse_list
from test_registry_support import pg_database  # noqa: F401 - fixture

runner = CliRunner()
D, R, C = 8, 4, 3  # a small k400-layout checkpoint (adapters before the MLP of blocks 0-1)


def official_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in (0, 1):
        p = f"transformer.resblocks.{i}.adapter_pre_mlp"
        for name, shape in (("fc1.weight", (R, D)), ("fc1.bias", (R,)), ("conv.weight", (R, 1, 3, 1, 1)),
                            ("conv.bias", (R,)), ("fc2.weight", (D, R)), ("fc2.bias", (D,))):
            state[f"{p}.{name}"] = torch.randn(shape, generator=g)
    state["fc.weight"], state["fc.bias"] = torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    return state


def import_cli(checkpoint: Path, tmp_path: Path, *extra: str):
    result = runner.invoke(app, ["import-official", str(checkpoint), "--task", "t", "--preset", "k400",
                                 "--out", str(tmp_path / "out"), "--no-register", *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    return result.output


def one_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, output
    return lines[0]


# -- import-official -------------------------------------------------------------------------------------

def test_an_expanded_tensor_declaring_more_values_than_the_file_holds_is_refused(tmp_path, home):
    state = official_state()
    state["fc.weight"] = torch.zeros(1).expand(10**7, D)  # stride 0: 4 bytes stored, 320 MB once copied
    state["fc.bias"] = torch.zeros(1).expand(10**7)
    torch.save({"model": state}, tmp_path / "c.pth")
    line = one_line(import_cli(tmp_path / "c.pth", tmp_path))
    assert "declare" in line and "more than the file's" in line


@pytest.mark.parametrize("how", ["sparse", "meta"])
def test_a_tensor_without_stored_dense_values_is_refused(tmp_path, home, how):
    state = official_state()
    state["fc.weight"] = state["fc.weight"].to_sparse() if how == "sparse" else state["fc.weight"].to("meta")
    torch.save(state, tmp_path / "c.pth")
    assert "fc.weight is a torch." in one_line(import_cli(tmp_path / "c.pth", tmp_path))


def test_a_key_with_a_newline_is_refused_on_one_line(tmp_path, home):
    state = official_state()
    state["fc.weight\nerror: forged"] = torch.zeros(1)
    torch.save(state, tmp_path / "c.pth")
    assert "is not an official key" in one_line(import_cli(tmp_path / "c.pth", tmp_path))


class System:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_zip_whose_pickle_calls_os_system_is_refused_without_torch_advice(tmp_path, home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as zin, zipfile.ZipFile(tmp_path / "c.pth", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, pickle.dumps(System(), protocol=2) if item.filename.endswith("data.pkl") else data)
    line = one_line(import_cli(tmp_path / "c.pth", tmp_path))
    assert "not a plain tensor file" in line and "system" in line
    assert "weights_only` set to `False`" not in line and "Re-running" not in line
    assert not (tmp_path / "pwned").exists()


def test_a_float8_checkpoint_is_read_as_float32(tmp_path):
    state = {k: v.to(torch.float8_e4m3fn) if k == "fc.weight" else v for k, v in official_state().items()}
    torch.save(state, tmp_path / "c.pth")
    from stadapter.official import infer_layout
    from stadapter.official.checkpoint import to_adapter_set

    read = read_checkpoint(tmp_path / "c.pth")
    out = to_adapter_set(read, infer_layout(read))
    assert out["head.weight"].dtype == torch.float32
    assert torch.equal(out["head.weight"], state["fc.weight"].to(torch.float32))


@pytest.mark.parametrize("content", [b"a\x1b[31m\nb\nc\n", b"a\x00\nb\nc\n", "a\u2028z\nb\nc\n".encode(),
                                     b"x" * 5000 + b"\nb\nc\n"], ids=["escape", "nul", "line-separator", "huge"])
def test_a_label_file_line_that_is_not_a_class_name_is_refused(tmp_path, home, content):
    torch.save({"model": official_state()}, tmp_path / "c.pth")
    (tmp_path / "labels.txt").write_bytes(content)
    line = one_line(import_cli(tmp_path / "c.pth", tmp_path, "--labels", str(tmp_path / "labels.txt")))
    assert "line 1 is not a class name" in line


def test_a_label_file_with_a_bom_and_crlf_gives_clean_names(tmp_path):
    (tmp_path / "labels.txt").write_bytes("\ufeffabseiling\r\nair drumming\r\nzumba\r\n".encode())
    assert read_label_file(tmp_path / "labels.txt", 3) == ["abseiling", "air drumming", "zumba"]


# -- names, filters --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["demo\n", "demo\r", "a" * 101])
def test_a_name_or_filter_with_a_trailing_newline_is_refused(value):
    with pytest.raises(RegistryError):
        check_name(value, "task")
    with pytest.raises(RegistryError):
        parse_ref(value)
    with pytest.raises(RegistryError):
        Filters(prefix=value)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    """A registry database URL: SQLite (a range over names) or PostgreSQL (LIKE with an escape)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'r.db'}"
    return request.getfixturevalue("pg_database")


def test_listing_filters_from_the_cli_treat_like_wildcards_literally(db, tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with open_registry(db, tmp_path / "home", upgrade=True) as reg:
        for i, task in enumerate(("a_b", "axb")):
            reg.register(make_bundle(tmp_path / f"b{i}", tiny_backbone, seed=i, task=task))
    out = runner.invoke(app, ["ls", "--prefix", "a_", "--db", db, "--json"])
    assert out.exit_code == 0, out.output
    assert [t["name"] for t in json.loads(out.output)["tasks"]] == ["a_b"]
    for bad in ("a%", "a\\", "a\n"):
        out = runner.invoke(app, ["ls", "--prefix", bad, "--db", db])
        assert out.exit_code == 1 and "invalid prefix" in one_line(out.output)


# -- training list files ---------------------------------------------------------------------------------

def test_a_list_file_with_a_bom_does_not_turn_its_comment_into_a_sample(tmp_path):
    (tmp_path / "train.txt").write_bytes("\ufeff# path label\r\nclip one.mp4 wave\r\n".encode())
    annotations = parse_list(tmp_path / "train.txt")
    assert [(s.path, s.label) for s in annotations.samples] == [(tmp_path / "clip one.mp4", 0)]
    assert annotations.classes == ["wave"]


# -- $STADAPTER_HOME/weights.json ------------------------------------------------------------------------

def test_a_deeply_nested_weights_index_is_ignored(home):
    home.mkdir()
    (home / "weights.json").write_text("[" * 200_000 + "]" * 200_000)
    assert weights_index.lookup("sha256:" + "0" * 64, "w.safetensors") is None


def test_a_weights_index_pointing_at_other_weights_never_loads_them(home, tmp_path, tiny_backbone):
    state = {k: v.contiguous() for k, v in tiny_backbone.state_dict().items()}
    save_file(state, tmp_path / "right.safetensors")
    save_file({k: v + 1 for k, v in state.items()}, tmp_path / "other.safetensors")
    right = load_backbone("tiny", str(tmp_path / "right.safetensors")).fingerprint()
    other = load_backbone("tiny", str(tmp_path / "other.safetensors")).fingerprint()
    assert right != other
    (home / "weights.json").write_text(json.dumps({right: {"path": str(tmp_path / "other.safetensors"),
                                                           "name": "right.safetensors"}}))
    with pytest.raises(BackboneError, match=r"now holds weights of fingerprint .*, not .*: pass --weights PATH"):
        load_backbone("tiny", "file:right.safetensors", fingerprint=right)
    (tmp_path / "right.safetensors").rename(tmp_path / "moved.safetensors")  # the honest case still works
    weights_index.remember(right, tmp_path / "moved.safetensors")
    assert load_backbone("tiny", "file:right.safetensors", fingerprint=right).fingerprint() == right


# -- the shared store at registration --------------------------------------------------------------------

def test_an_unwritable_shared_store_fails_the_registration_and_loses_nothing(tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    with open_registry(db, tmp_path / "home", upgrade=True) as reg:
        first = reg.register(make_bundle(tmp_path / "b1", tiny_backbone, seed=1)).ref
        (tmp_path / "afile").write_bytes(b"not a folder")
        monkeypatch.setenv(ENV, f"file://{tmp_path / 'afile' / 'store'}")
        with pytest.raises(RegistryError, match=r"^cannot publish blob .* to the shared store file://"):
            reg.register(make_bundle(tmp_path / "b2", tiny_backbone, seed=2))
        monkeypatch.delenv(ENV)
        assert [v.ref for v in reg.list_versions("demo")] == [first]
        assert reg.load_bundle(first).labels == ["pan left", "pan right", "zoom in"]
    assert (tmp_path / "afile").read_bytes() == b"not a folder"


def test_a_shared_store_blob_grown_after_its_size_check_is_read_only_one_byte_past_it(tmp_path):
    import hashlib
    import io

    from stadapter.registry.remote import SharedStore

    store = SharedStore(f"file://{tmp_path / 'store'}")
    data = b"x" * 1000
    sha = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "store" / "blobs" / sha[:2] / sha[2:]
    blob.parent.mkdir(parents=True)
    (tmp_path / "elsewhere").write_bytes(data)
    blob.symlink_to(tmp_path / "elsewhere")  # a symlink out of the store: read, then checked like any blob
    assert store.has(sha, len(data))
    out = io.BytesIO()
    assert store.download(sha, out, len(data)) == sha and out.getvalue() == data
    (tmp_path / "elsewhere").write_bytes(data * 50)  # swapped for a larger file after has()
    out = io.BytesIO()
    assert store.download(sha, out, len(data)) != sha
    assert len(out.getvalue()) == len(data) + 1


# -- export ----------------------------------------------------------------------------------------------

def test_export_refuses_a_symlink_even_a_dangling_one_and_writes_nothing(home, tmp_path, tiny_backbone):
    with open_registry() as reg:
        ref = reg.register(make_bundle(tmp_path / "b", tiny_backbone)).ref
    (tmp_path / "model.pt").symlink_to(tmp_path / "nowhere.pt")
    (tmp_path / "other.pt.json").symlink_to(tmp_path / "nowhere.json")
    before = sorted(os.listdir(tmp_path))
    for name in ("model.pt", "other.pt"):
        result = runner.invoke(app, ["export", ref, str(tmp_path / name), "--format", "torchscript"])
        assert result.exit_code == 1 and "already exists" in one_line(result.output)
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "model.pt").is_symlink() and (tmp_path / "other.pt.json").is_symlink()


# -- figures in bundles ----------------------------------------------------------------------------------

def crafted_png(width: int, height: int, tail: bytes) -> bytes:
    """A PNG signature and an IHDR chunk declaring ``width`` x ``height``, then ``tail`` (no image data)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + tail


def test_a_crafted_figure_is_stored_as_bytes_never_decoded_and_capped_in_size(home, tmp_path, tiny_backbone):
    import dataclasses

    from stadapter.bundle import Bundle
    from stadapter.bundle.format import MAX_IMAGE_BYTES
    from stadapter.errors import BundleError

    bundle = Bundle.load(make_bundle(tmp_path / "b", tiny_backbone), verify=False)
    bomb = crafted_png(2**31 - 1, 2**31 - 1, os.urandom(4096))  # 8 EiB of pixels declared, garbage after IHDR
    bundle = dataclasses.replace(bundle, figures={"curves.png": bomb})
    bundle.save(tmp_path / "hostile")
    with open_registry() as reg:
        ref = reg.register(tmp_path / "hostile").ref
        assert reg.load_bundle(ref).figures["curves.png"] == bomb
    with pytest.raises(BundleError, match="is not a PNG file of at most"):
        dataclasses.replace(bundle, figures={"curves.png": crafted_png(1, 1, b"\0" * MAX_IMAGE_BYTES)})
    with pytest.raises(BundleError, match="is not a PNG file of at most"):
        dataclasses.replace(bundle, figures={"confusion.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64})  # no IHDR


# -- GET /v1/tasks ---------------------------------------------------------------------------------------

def test_listing_parameters_over_http_are_clear_client_errors(home, tmp_path, tiny_backbone):
    from fastapi.testclient import TestClient

    from stadapter.runtime.engine import Engine
    from stadapter.runtime.server import ServerConfig, create_app

    with open_registry() as reg:
        for i, task in enumerate(("a_b", "axb")):
            reg.register(make_bundle(tmp_path / f"b{i}", tiny_backbone, seed=i, task=task))
        engine = Engine(tiny_backbone, reg, device="cpu")
        with TestClient(create_app(engine, ServerConfig())) as client, contextlib.closing(engine):
            assert [t["task"] for t in client.get("/v1/tasks", params={"prefix": "a_"}).json()["tasks"]] == ["a_b"]
            for params in ({"limit": "-1"}, {"limit": "0"}, {"limit": "1" + "0" * 30}, {"limit": "abc"}):
                assert client.get("/v1/tasks", params=params).status_code in (400, 422), params
            for params in ({"prefix": "%"}, {"prefix": "a\\"}, {"prefix": "a\n"}, {"after": "z" * 5000},
                           {"alias": "%"}, {"tag": "k" * 300}):
                r = client.get("/v1/tasks", params=params)
                assert r.status_code == 400, params
                assert len(r.text) < 1000 and "Traceback" not in r.text


# -- fetch on miss from the Hub --------------------------------------------------------------------------

def test_a_hub_file_listed_at_another_size_is_never_downloaded(hub, tiny_backbone, tmp_path,  # noqa: F811
                                                                monkeypatch):
    import shutil

    from stadapter.errors import BundleError
    from stadapter.hub import push_version

    monkeypatch.delenv(ENV, raising=False)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    with open_registry(db, tmp_path / "a", upgrade=True) as a, open_registry(db, tmp_path / "b") as b:
        info = a.register(make_bundle(tmp_path / "bundle", tiny_backbone, seed=5))
        push_version(a, info.ref, "team/big", endpoint=hub.url, token=TOKEN, timeout=10)
        grown = (a.materialize(info) / "adapter.safetensors").read_bytes() + b"\0" * (4 << 20)
        hub.tamper("team/big", "adapter.safetensors", grown)
        shutil.rmtree(a.home)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("STADAPTER_HOME", str(b.home))
        with pytest.raises(BundleError, match=r"\(lacks README.md, adapter.safetensors as registered\)"):
            b.materialize(info.ref)
    fetched = [p for p in tmp_path.rglob("*") if p.is_file() and "hub-data" not in str(p)
               and p.stat().st_size == len(grown)]
    assert fetched == []


def test_a_list_label_too_long_for_a_bundle_is_refused_before_training(home, tmp_path):
    from stadapter.errors import BundleError
    from stadapter.recipes import preset
    from stadapter.training.api import train_task

    (tmp_path / "train.txt").write_text(f"a.mp4\t{'x' * 2000}\nb.mp4\twave\n")
    annotations = parse_list(tmp_path / "train.txt")
    with pytest.raises(BundleError, match=r"class names must be 1 to 1000 characters long"):
        train_task("demo", preset("k400"), annotations.samples, annotations.classes, None, "tiny", "none",
                   tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
