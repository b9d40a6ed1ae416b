"""The CUDA paths (issue 23): half-precision serving, mixed-task batches, the compiled / CUDA-graph path, the
pool's side-stream copies under an eviction storm, and one AMP training step.

Every test runs once per device: the ``cuda`` variant is marked ``cuda`` and skipped without a GPU (run them on
one with ``pytest -m cuda``); the ``cpu`` variant runs the same body on the CPU wherever the logic does not
depend on the device (CPU stand-ins: float16 serving on the CPU, dynamo's ``eager`` backend instead of
``reduce-overhead``, the memory-mapped tier instead of pinned memory and the copy stream, bf16 autocast instead
of fp16 + GradScaler). Backbones: ``tiny`` on the CPU, ``small`` (6 blocks, width 192) on CUDA (the compiled test:
``tiny`` on both, to keep inductor's compiles short); always a fresh instance, since an engine casts and moves
the backbone it is given in place.

Tolerances, stated once (``tol``): on logits, the largest absolute difference over the largest absolute
reference logit (at least 1): fp32 1e-4, fp16 1e-2, bf16 5e-2.
"""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch

from stadapter.config import AdapterConfig, TrainConfig
from stadapter.model.loading import load_backbone
from stadapter.model.video_vit import VideoViT
from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine
from test_runtime_support import clips, reference, register

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
]
RELATIVE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def backbone_for(device: str):
    return load_backbone("small" if device == "cuda" else "tiny", "none")


def serving_dtype(device: str) -> torch.dtype:
    return torch.float16  # the engine's CUDA default; on the CPU asked for explicitly


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float().cpu(), ref.float().cpu()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def tol(dtype: torch.dtype) -> float:
    return RELATIVE_TOL[dtype]


@pytest.fixture
def reg(home):
    with open_registry() as r:
        yield r


def same_layout_tasks(reg, tmp_path, backbone, n: int = 8) -> dict:
    """``n`` tasks of one bank layout (width 8, kernel (3, 1, 1), attn slots, gelu), different heads."""
    return {f"same{j}": register(reg, tmp_path, backbone, f"same{j}", seed=40 + j, num_classes=3 + j, width=8,
                                 activation="gelu")
            for j in range(n)}


def inputs(backbone, n: int, seed: int) -> torch.Tensor:
    return clips(n, t=4, size=backbone.image_size[0], seed=seed)


# -- serving -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_backbone_matches_fp32(device, reg, tmp_path):
    """The engine in fp16 (the CUDA default) against the fp32 training module on the CPU, task by task."""
    bb = backbone_for(device)
    tasks = {name: register(reg, tmp_path, bb, name, seed=i, **layout) for i, (name, layout) in enumerate({
        "plain": dict(num_classes=5, width=8),
        "both": dict(num_classes=3, width=16, positions=("attn", "mlp")),
        "patch": dict(num_classes=7, width=8, last_k=1, activation="gelu", pool="patch-mean"),
    }.items())}
    engine = Engine(backbone_for(device), reg, device=device, dtype=serving_dtype(device))
    assert next(engine.backbone.parameters()).dtype == torch.float16
    x = inputs(bb, 3, seed=1)
    for name, (_, t, m) in tasks.items():
        out = torch.stack(engine.forward(list(x), [engine.resolve(name)] * 3))
        ref = reference(m, t, x)  # fp32, CPU
        assert out.dtype == torch.float32
        assert rel_diff(out, ref) <= tol(torch.float16), (name, rel_diff(out, ref))
        assert rel_diff(out, ref) > 0  # half precision really ran (not silently fp32)
    engine.close()


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_task_batch_equals_each_task_alone(device, reg, tmp_path):
    """32 clips over 9 tasks (8 of one layout, 1 of another) in one fp16 batch: each clip's logits as when its
    task runs alone, and as the fp32 training module gives them."""
    bb = backbone_for(device)
    tasks = same_layout_tasks(reg, tmp_path, bb)
    tasks |= {"wide": register(reg, tmp_path, bb, "wide", seed=9, num_classes=4, width=16,
                               positions=("attn", "mlp"))}
    engine = Engine(backbone_for(device), reg, device=device, dtype=serving_dtype(device))
    names = [n for n in tasks for _ in range(4)][:32]
    random.Random(0).shuffle(names)
    x = inputs(bb, len(names), seed=2)
    mixed = engine.forward(list(x), [engine.resolve(n) for n in names])
    for i, n in enumerate(names):
        alone = engine.forward([x[i]], [engine.resolve(n)])[0]
        assert rel_diff(mixed[i], alone) <= tol(torch.float16), (n, rel_diff(mixed[i], alone))
        _, t, m = tasks[n]
        assert rel_diff(mixed[i], reference(m, t, x[i:i + 1])[0]) <= tol(torch.float16), n
    engine.close()


def dynamo_counts() -> dict[str, int]:
    """Graphs dynamo compiled and CUDA graphs inductor recorded, so far in this process."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_recorded_inputs": counters["inductor"]["cudagraph_recorded_non_static_inputs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_path_switches_among_8_tasks_without_recompiling_or_recapturing(device, reg, tmp_path):
    """Compiled (CUDA: ``reduce-overhead``, i.e. inductor + CUDA graphs; CPU: dynamo's eager backend): after
    warm-up rounds on one task (CUDA graph trees warm up, record, then replay), serving 8 tasks of one layout,
    alone and mixed, in the same pattern of batch sizes compiles no graph, records no CUDA graph and skips
    none, and gives each task its own outputs."""
    import torch._dynamo

    bb = load_backbone("tiny", "none")  # on CUDA too: inductor compiles one graph per batch bucket
    tasks = same_layout_tasks(reg, tmp_path, bb)
    names = list(tasks)
    mode = "reduce-overhead" if device == "cuda" else "eager"
    engine = Engine(load_backbone("tiny", "none"), reg, device=device, dtype=serving_dtype(device), compile=mode)
    x = inputs(bb, 8, seed=3)
    handles = {n: engine.resolve(n) for n in names}
    for n in names:  # resident before any timing of graphs (loading is not what is checked here)
        engine.acquire(handles[n])

    refs = {n: reference(m, t, x) for n, (_, t, m) in tasks.items()}  # fp32 on the CPU, every clip

    def serve(batch_names: list[str]) -> None:
        out = engine.forward(list(x[:len(batch_names)]), [handles[n] for n in batch_names])
        for i, n in enumerate(batch_names):
            assert rel_diff(out[i], refs[n][i]) <= tol(torch.float16), (n, rel_diff(out[i], refs[n][i]))

    pattern = [8, 2, 1]  # batch buckets, in the order every round serves them
    torch._dynamo.reset()
    for _ in range(3 if device == "cuda" else 1):  # CUDA graph trees: warm up, record, then replay
        for size in pattern:
            serve([names[0]] * size)
    before = dynamo_counts()
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for k in range(len(names)):
            serve([names[(k + j) % len(names)] for j in range(8)])  # a batch mixing all 8
            serve([names[(k + 3) % len(names)]] * 2)
            serve([names[(k + 5) % len(names)]])
    finally:
        torch.compiler.set_stance("default")
    after = dynamo_counts()
    assert after == before, f"task switches compiled or recorded again: {before} -> {after}"
    assert before["cudagraph_skips"] == 0, "CUDA graphs were skipped for the compiled path"
    if device == "cuda":
        assert before["cudagraph_recorded_inputs"] > 0, "no CUDA graph was recorded"
    (bank,) = engine._compiled.banks.values()
    assert bank.writes == len(names)  # each set copied into its bank slot once
    engine.close()


@pytest.mark.parametrize("host_tier", [True, False], ids=["host-tier", "store-only"])
@pytest.mark.parametrize("device", DEVICES)
def test_pool_copies_stay_ordered_under_an_eviction_storm(device, host_tier, reg, tmp_path):
    """A pool of ONE resident set serving 6 tasks in a random order, with prefetches racing from another
    thread: every load evicts the set the previous batch used (CUDA: its memory freed while the compute stream
    may still read it; the next set copied in on the side stream), yet every result equals a roomy engine's."""
    bb = backbone_for(device)
    tasks = same_layout_tasks(reg, tmp_path, bb, n=6)
    names = list(tasks)
    dtype = serving_dtype(device)
    roomy = Engine(backbone_for(device), reg, device=device, dtype=dtype, max_resident=64)
    tight = Engine(backbone_for(device), reg, device=device, dtype=dtype, max_resident=1,
                   host_max_bytes=(8 << 30) if host_tier else 0, prefetch_workers=2)
    x = inputs(bb, 4, seed=4)
    expected = {n: torch.stack(roomy.forward(list(x), [roomy.resolve(n)] * 4)) for n in names}
    rng = random.Random(1)
    order = [rng.choice(names) for _ in range(60)]
    stop = threading.Event()

    def storm() -> None:  # prefetches of random tasks: loads (and evictions) while batches run
        r = random.Random(2)
        while not stop.is_set():
            tight.prefetch(tight.resolve(r.choice(names)))
            stop.wait(0.001)

    racer = threading.Thread(target=storm, daemon=True)
    racer.start()
    try:
        for n in order:
            out = torch.stack(tight.forward(list(x), [tight.resolve(n)] * 4))
            assert rel_diff(out, expected[n]) <= 1e-3, (n, rel_diff(out, expected[n]))
    finally:
        stop.set()
        racer.join()
    s = tight.pool.stats
    assert s.evictions >= len(order) // 2, s  # it really was a storm
    if device == "cuda" and host_tier:
        assert s.host_hits > 0, s  # promotions from pinned memory were exercised
    roomy.close()
    tight.close()


# -- training ------------------------------------------------------------------------------------------

Step = tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]


def one_step(device: str, amp: bool, backbone, batch) -> Step:
    """One optimizer step of the training loop's own stepper -> (loss, tensors before, gradients, after)."""
    from stadapter.training import dist as D
    from stadapter.training.loop import AdapterParams, _Stepper, autocast_dtype
    from stadapter.training.optim import make_optimizer
    from stadapter.video.datasets import SkipCounter

    dev = torch.device(device)
    cfg = TrainConfig(batch_size=len(batch[0]), amp=amp, cpu_bf16=amp)
    bb = copy.deepcopy(backbone).to(dev)
    if dev.type == "cuda" and amp:
        bb = bb.half()  # as training.api.prepare_backbone: the frozen backbone in fp16, adapters fp32
    model = VideoViT(bb, AdapterConfig(num_classes=5, width=16, positions=("attn", "mlp")), num_frames=4)
    g = torch.Generator().manual_seed(5)
    init = {k: v + torch.randn(v.shape, generator=g) * 0.05  # non-identity adapters: every gradient non-zero
            for k, v in model.init_adapter_set(torch.Generator().manual_seed(0)).items()}
    module = AdapterParams(model, {k: v.to(dev, copy=True) for k, v in init.items()}, seed=0)
    opt = make_optimizer(module.tensors(), cfg, 1e-3)
    amp_dtype = autocast_dtype(cfg, dev)
    assert (amp_dtype is not None) == amp
    # the loop's scaler starts at 2**16 and skips steps that overflow until it has backed off; one step is
    # compared here, so it starts where a run settles
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=amp_dtype is torch.float16)
    stepper = _Stepper(module, module, opt, scaler, D.DistInfo(), dev, amp_dtype, accum=1, batch=len(batch[0]))
    model.train()
    loss, n = stepper.step(iter([batch]), epoch=0, lr=1e-3, skips=SkipCounter())
    assert n == len(batch[0])
    assert all(p.dtype == torch.float32 for p in module.params), "adapters and head stay fp32 under AMP"
    grads = {k: p.grad.detach().float().cpu() for k, p in module.tensors().items()}
    after = {k: p.detach().float().cpu() for k, p in module.tensors().items()}
    return loss, init, grads, after


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("device", DEVICES)
def test_one_amp_training_step_matches_the_fp32_step(device):
    """CUDA: fp16 backbone + fp16 autocast + GradScaler (the loop's AMP); CPU: bf16 autocast. Against the fp32
    step: the loss within 1e-2 (fp16) / 3e-2 (bf16) relative; each tensor's gradient at cosine >= 0.995 /
    0.99 and its norm within 5e-2 / 1e-1; each tensor's update (after - before) at cosine >= 0.95 / 0.9 (the
    step was taken, not skipped by the scaler, and went the same way)."""
    bb = backbone_for(device)
    x = inputs(bb, 4, seed=6)
    batch = (torch.arange(4), x, torch.tensor([0, 1, 2, 3]), [])
    loss32, before, g32, p32 = one_step(device, False, bb, batch)
    loss16, _, g16, p16 = one_step(device, True, bb, batch)
    fp16 = device == "cuda"
    assert abs(loss16 - loss32) / abs(loss32) <= (1e-2 if fp16 else 3e-2), (loss16, loss32)
    live = [k for k in g32 if float(g32[k].norm()) > 0]
    # with CLS pooling the last block's MLP adapter cannot reach the output (its delta is zero on the CLS row)
    assert len(live) >= len(g32) - 6 and "head.weight" in live, sorted(set(g32) - set(live))
    for k in g32:
        if k not in live:
            assert float(g16[k].abs().max()) == 0, f"{k}: no path to the loss in fp32, yet a gradient under AMP"
            continue
        assert cosine(g16[k], g32[k]) >= (0.995 if fp16 else 0.99), (k, cosine(g16[k], g32[k]))
        assert abs(float(g16[k].norm()) / float(g32[k].norm()) - 1) <= (5e-2 if fp16 else 1e-1), k
        u16, u32 = p16[k] - before[k], p32[k] - before[k]
        assert float(u16.abs().max()) > 0, f"{k}: the AMP step was skipped"
        assert cosine(u16, u32) >= (0.95 if fp16 else 0.9), (k, cosine(u16, u32))
