"""The model: resolving and identifying it (resolution), its engines (torch, ONNX Runtime,
OpenVINO), tokenizing and batch planning (tokenize), the embedder actors call (embed, vectors),
provenance, whitening fits, and `prepare`, which the driver runs once before any work.

May import: config, io, methods. Never Ray, evaluation or the run.
"""
