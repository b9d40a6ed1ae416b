"""The runtime: hot-swapped adapter sets, mixed-task batches, the pool's tiers and budget, test views."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stadapter.config import TaskSpec
from stadapter.errors import AdapterSetError, BackboneError, RegistryError
from stadapter.model.loading import load_backbone
from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine
from stadapter.runtime.inputs import clip_views, frame_plan
from stadapter.runtime.pool import read_header, storage_bytes
from stadapter.video.decode import decode_frames, probe
from stadapter.video.sampling import sample_indices
from stadapter.video.transforms import test_views as make_test_views

from test_runtime_support import LAYOUTS, clips, make_bundle, reference, register, write_clip

TOL = 1e-5


@pytest.fixture
def reg(home):
    with open_registry() as r:
        yield r


@pytest.fixture
def tasks(reg, tmp_path, tiny_backbone):
    """Five tasks of different class counts and layouts: name -> (info, tensors, reference model)."""
    return {name: register(reg, tmp_path, tiny_backbone, name, seed=i, **layout)
            for i, (name, layout) in enumerate(LAYOUTS.items())}


def engine_for(reg, backbone, **kw) -> Engine:
    return Engine(backbone, reg, device="cpu", **kw)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


def test_alternating_tasks_give_each_tasks_own_outputs(reg, tasks, tiny_backbone):
    engine = engine_for(reg, tiny_backbone)
    x = clips(2, seed=3)
    expected = {n: reference(m, t, x) for n, (_, t, m) in tasks.items()}
    # random, non-zero weights: every task's outputs differ from every other's (a missed swap would show)
    assert not torch.allclose(expected["alpha"][:, :3], expected["beta"])
    order = ["alpha", "beta", "alpha", "gamma", "beta", "beta", "delta", "alpha", "eps", "gamma", "alpha"]
    for name in order:
        h = engine.resolve(name)
        out = torch.stack(engine.forward(list(x), [h, h]))
        assert close(out, expected[name]), name
    assert engine.swaps == len(order) - 1  # every change of task bound another set; the repeat did not
    assert engine.pool.stats.misses == len(LAYOUTS) and engine.pool.stats.hits == len(order) - len(LAYOUTS)



def test_a_batch_is_cut_into_one_segment_per_run_of_a_task(reg, tasks, tiny_backbone):
    from stadapter.runtime.types import segments_of

    engine = engine_for(reg, tiny_backbone)
    a, b = engine.resolve("alpha"), engine.resolve("beta")
    sets = {h.key: engine.acquire(h) for h in (a, b)}
    segments = segments_of([a, a, b, a], sets)
    assert [(s.start, s.stop, s.handle) for s in segments] == [(0, 2, a), (2, 3, b), (3, 4, a)]
    assert all(s.resident is sets[s.handle.key] for s in segments)
    assert segments[1].rows(4) == slice(8, 12)
    assert segments_of([], sets) == []

def test_mixed_batch_equals_each_task_alone(reg, tmp_path, tasks, tiny_backbone):
    # plus a task with other frames (grouped by frame count) and a BitFit task (its own backbone pass)
    two, t2, m2 = register(reg, tmp_path, tiny_backbone, "twoframes", seed=11, num_classes=3, width=8,
                           spec=TaskSpec(num_frames=2, sampling="segments", flip=False))
    bit, tb, mb = register(reg, tmp_path, tiny_backbone, "bitfit", seed=12, num_classes=4, method="bitfit")
    every = {**tasks, "twoframes": (two, t2, m2), "bitfit": (bit, tb, mb)}
    engine = engine_for(reg, tiny_backbone)
    rng = np.random.default_rng(0)
    names = [n for n in every for _ in range(2)] + ["alpha", "beta"]
    rng.shuffle(names)
    xs = [clips(1, t=every[n][2].num_frames, seed=100 + i)[0] for i, n in enumerate(names)]
    mixed = engine.forward(xs, [engine.resolve(n) for n in names])
    for i, n in enumerate(names):
        _, t, m = every[n]
        alone_ref = reference(m, t, xs[i][None])[0]
        alone_engine = engine.forward([xs[i]], [engine.resolve(n)])[0]
        assert mixed[i].shape == (m.config.num_classes,)
        assert close(mixed[i], alone_ref), (n, (mixed[i] - alone_ref).abs().max())
        assert close(mixed[i], alone_engine), n


def test_predict_averages_softmax_over_each_tasks_views(reg, tmp_path, tiny_backbone):
    info, t, m = register(reg, tmp_path, tiny_backbone, "views", seed=5, num_classes=6,
                          spec=TaskSpec(num_frames=4, temporal_views=2, spatial_views=3))
    other, t2, m2 = register(reg, tmp_path, tiny_backbone, "single", seed=6, num_classes=3)
    engine = engine_for(reg, tiny_backbone)
    va, vb = clips(6, seed=1), clips(1, seed=2)
    pa, pb = engine.predict([(va, engine.resolve("views")), (vb, engine.resolve("single"))])
    assert close(pa, reference(m, t, va).softmax(-1).mean(0))
    assert close(pb, reference(m2, t2, vb).softmax(-1)[0])
    assert abs(float(pa.sum()) - 1) < 1e-5


def test_pool_eviction_under_a_tiny_budget_still_serves_correct_results(reg, tasks, tiny_backbone):
    engine = engine_for(reg, tiny_backbone, max_resident=1)
    x = clips(3, seed=4)
    names = ["alpha", "beta", "gamma", "alpha", "delta", "beta", "eps", "alpha"]
    for round_ in range(2):
        for name in names:
            _, t, m = tasks[name]
            h = engine.resolve(name)
            assert close(torch.stack(engine.forward(list(x[:1]), [h])), reference(m, t, x[:1]))
        # a mixed batch of three tasks under a budget of one set still gives each its own outputs
        mix = ["gamma", "alpha", "beta"]
        out = engine.forward(list(x), [engine.resolve(n) for n in mix])
        for i, n in enumerate(mix):
            _, t, m = tasks[n]
            assert close(out[i], reference(m, t, x[i:i + 1])[0]), n
        assert len(engine.pool.resident_keys()) == 1
    assert engine.pool.stats.evictions > 10
    # a byte budget works the same way
    small = engine_for(reg, tiny_backbone, max_resident=None, max_resident_bytes=1)
    for name in names:
        _, t, m = tasks[name]
        assert close(torch.stack(small.forward(list(x[:1]), [small.resolve(name)])), reference(m, t, x[:1]))
    assert len(small.pool.resident_keys()) == 1


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_binding_a_resident_set_copies_no_tensor(reg, tasks, tiny_backbone):
    engine = engine_for(reg, tiny_backbone)
    h = engine.resolve("beta")
    first = engine.acquire(h)
    with _Ops() as seen:
        again = engine.acquire(h)
    assert again is first and seen.ops == [], seen.ops  # a pool hit runs no tensor op at all
    # the tensors the forward reads are the resident ones (same storage), and they are views of one buffer
    slot_ptrs = {t.data_ptr() for w in first.slots.values() for t in w.values()}
    assert slot_ptrs <= {t.data_ptr() for t in first.tensors.values()}
    assert len({t.untyped_storage().data_ptr() for t in first.tensors.values()}) == 1
    # resident bytes are exactly the bundle file's tensor bytes (resident_ratio 1.0 on the CPU)
    path = engine._locate(h)
    offset, entries = read_header(path)
    assert storage_bytes(first.tensors) == path.stat().st_size - offset == first.nbytes
    # bound tensors equal the registered ones
    _, tensors, _ = tasks["beta"]
    assert all(torch.equal(first.tensors[k], tensors[k]) for k in tensors)
    # the copying mode (private memory instead of a shared map) gives the same values
    copying = engine_for(reg, tiny_backbone, mmap=False)
    rs = copying.acquire(copying.resolve("beta"))
    assert all(torch.equal(rs.tensors[k], tensors[k]) for k in tensors)


def test_prefetch_makes_the_set_resident_before_the_request(reg, tasks, tiny_backbone):
    engine = engine_for(reg, tiny_backbone)
    h = engine.resolve("gamma")
    engine.prefetch(h)
    deadline = time.monotonic() + 10
    while engine.pool.where(h.key) != "device" and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.acquire(h)
    s = engine.pool.stats
    assert (s.prefetches, s.misses, s.hits) == (1, 0, 1)


def test_alias_changes_are_picked_up_after_the_ttl(reg, tmp_path, tiny_backbone):
    v1, t1, m = register(reg, tmp_path, tiny_backbone, "aliased", seed=1, num_classes=4)
    v2, t2, _ = register(reg, tmp_path, tiny_backbone, "aliased", seed=2, num_classes=4)
    reg.set_alias("aliased", "production", 1)
    now = [100.0]  # a clock the test drives, so a slow machine cannot outrun the TTL
    engine = engine_for(reg, tiny_backbone, alias_ttl=30.0, clock=lambda: now[0])
    x = clips(1, seed=9)
    assert engine.resolve("aliased").name == "aliased:1"
    assert close(torch.stack(engine.forward(list(x), [engine.resolve("aliased")])), reference(m, t1, x))
    reg.set_alias("aliased", "production", 2)
    now[0] += 29.0
    assert engine.resolve("aliased").name == "aliased:1"  # still within the TTL
    now[0] += 1.5
    h = engine.resolve("aliased")
    assert h.name == "aliased:2"
    assert close(torch.stack(engine.forward(list(x), [h])), reference(m, t2, x))
    assert engine.resolve("aliased:1").name == "aliased:1"  # a pinned version never moves


def test_refuses_unknown_tasks_and_bundles_of_another_backbone(reg, tmp_path, tiny_backbone):
    other = load_backbone("open_clip:ViT-B-16?image_size=32&patch_size=8&width=64&layers=2&head_width=16", "none")
    d, _, _ = make_bundle(tmp_path / "foreign", other, "foreign", seed=1)
    reg.register(d)
    engine = engine_for(reg, tiny_backbone)
    with pytest.raises(BackboneError) as e:
        engine.resolve("foreign")
    assert tiny_backbone.fingerprint() in str(e.value) and other.fingerprint() in str(e.value)
    with pytest.raises(RegistryError):
        engine.resolve("missing")


def test_a_corrupt_layout_is_refused_naming_the_tensors(reg, tmp_path, tiny_backbone):
    d, tensors, _ = make_bundle(tmp_path / "ok", tiny_backbone, "shapes", seed=1, num_classes=5, width=8)
    info = reg.register(d)
    engine = engine_for(reg, tiny_backbone)
    h = engine.resolve("shapes")
    # a handle whose layout disagrees with the file (as a bundle whose config lies about its tensors would)
    from dataclasses import replace

    bad = replace(h, expected={**h.expected, "head.weight": (9, 64)})
    with pytest.raises(AdapterSetError, match="head.weight"):
        engine.acquire(bad)
    assert engine.pool.where(info.id) is None


def test_each_task_gets_its_own_frames_and_views_from_one_decode(tmp_path, tiny_backbone):
    path = write_clip(tmp_path / "clip.mp4", frames=30)
    specs = [TaskSpec(num_frames=4, sampling="segments", flip=False),
             TaskSpec(num_frames=4, sampling="dense", frame_stride=3, temporal_views=2, spatial_views=3),
             TaskSpec(num_frames=2, sampling="dense", frame_stride=8)]
    length = probe(path).num_frames
    union, positions = frame_plan(length, specs)
    for spec, pos in zip(specs, positions):
        assert np.array_equal(union[pos], sample_indices(length, spec, train=False))
    bb = tiny_backbone
    views = clip_views(path, specs, bb.image_size[0], bb.mean, bb.std)
    for spec, v in zip(specs, views):
        idx = sample_indices(length, spec, train=False)
        alone = make_test_views(decode_frames(path, idx.reshape(-1)).reshape(*idx.shape, *decode_frames(
            path, [0]).shape[1:]), spec, bb.image_size[0], bb.mean, bb.std)
        assert v.shape == (spec.temporal_views * spec.spatial_views, spec.num_frames, 3, 32, 32)
        assert torch.equal(v, alone)


def test_compiled_path_serves_another_task_without_recompiling(reg, tmp_path, tiny_backbone):
    """The optional torch.compile path (CUDA in production; dynamo's eager backend here): adapter weights are
    graph inputs in fixed bank slots, so switching or mixing tasks of one layout reuses the graph."""
    import torch._dynamo

    same = {f"same{j}": register(reg, tmp_path, tiny_backbone, f"same{j}", seed=30 + j, num_classes=3 + j, width=8,
                               activation="gelu")
            for j in range(4)}
    engine = engine_for(reg, tiny_backbone, compile="eager")
    x = clips(4, seed=8)

    def check(names):
        out = engine.forward(list(x[:len(names)]), [engine.resolve(n) for n in names])
        for i, n in enumerate(names):
            _, t, m = same[n]
            assert close(out[i], reference(m, t, x[i:i + 1])[0]), n

    torch._dynamo.reset()
    for n in (4, 2, 1):  # one graph per batch bucket
        check(["same0"] * n)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        check(["same1"] * 4)
        check(["same2", "same3", "same0", "same1"])  # a mixed batch through the same graph
        check(["same3"])
        check(["same1", "same2"])
    finally:
        torch.compiler.set_stance("default")
    (bank,) = engine._compiled.banks.values()
    assert bank.writes == 4  # each set written into its slot once; later binds only index it


@pytest.mark.parametrize("kernel, activation, frames", [((3, 1, 1), "none", 4), ((5, 1, 1), "gelu", 4),
                                                        ((3, 1, 1), "none", 1), ((3, 1, 1), "relu", 2), (None, "gelu", 4)])
def test_inference_kernel_equals_the_model_adapter(kernel, activation, frames):
    from stadapter.model.adapter import adapter_delta, init_adapter_tensors, st_adapter, temporal_only

    g = torch.Generator().manual_seed(1)
    w = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in init_adapter_tensors(16, 8, kernel, g).items()}
    x = torch.randn(2 * frames, 1 + 9, 16, generator=g)
    assert temporal_only(w)  # the path where the prefix rows ride along through the taps
    out = x + adapter_delta(x, w, frames, 1, activation)
    assert close(out, st_adapter(x, w, frames, (3, 3), 1, activation))
    assert torch.equal(out[:, 0], x[:, 0])  # the CLS token bypasses the adapter
