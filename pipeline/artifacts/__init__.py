"""Artifact formats: one module per on-disk format, each with its writer, its readers and a FORMAT version.

    packed_w4     the pack stage's int4 checkpoint (AutoAWQ GEMM layout, canonical names)
    w8a8          the quant_w8 stage's int8 W8A8 checkpoint (compressed-tensors, Hugging Face names)
    kv_qparams    static KV-cache quantization parameters (kv_qparams stage; quant_w8 for the smoothed model)
    workspace     the turbomind stage's serving workspace (TurboMind layout, config.ini, TP shards)

Stages write and read their artifacts through these modules and never import each other; this package
imports no stage.
"""
