"""Serving: one frozen backbone, many tasks.

    pool.py      adapter sets under a memory budget (device, pinned host, local store), LRU, prefetch
    engine.py    the backbone loaded once; tasks resolved through the registry; mixed-task batches
    kernels.py   the ST-Adapter for inference (fewer passes over memory than the model's function)
    compiled.py  optional torch.compile / CUDA-graph path with adapter weights in fixed bank slots
    inputs.py    a clip decoded once into every task's own test views
    server.py    the HTTP API (FastAPI) with dynamic batching in one worker thread
"""
