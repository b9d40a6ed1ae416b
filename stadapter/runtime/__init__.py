"""Serving: one frozen backbone, many tasks.

    types.py     the seams: the Registry protocol, TaskHandle, Segment (a batch's run of one task's clips)
    pool.py      adapter sets under a memory budget (device, pinned host, local store), LRU, prefetch
    engine.py    the backbone loaded once; tasks resolved through the registry; mixed-task batches
    kernels.py   the adapter hook of a mixed-task batch: each task's adapter delta added into its own rows
    compiled.py  optional torch.compile / CUDA-graph path with adapter weights in fixed bank slots
    inputs.py    a clip decoded once into every task's own test views
    predict.py   top-k answers per task (one JSON shape for CLI and HTTP), and predict_files for the CLI
    batcher.py   dynamic batching in one worker thread that owns the model; failure isolation
    uploads.py   request bodies read as they stream, under size and time limits; multipart uploads
    httpguard.py the HTTP trust boundary: bearer token, header deadline, server paths out of error bodies
    server.py    the HTTP API (FastAPI): status codes, metrics, the endpoints
"""
