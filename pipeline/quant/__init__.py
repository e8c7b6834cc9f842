"""Quantization math and helpers behind the calibrate / kv_qparams / awq / pack stages.

    calib_data.py  calibration token sets (embedded corpus, a local file, named `datasets` sets)
    blockwise.py   run the reference model one decoder block at a time
    stats.py       per-channel activation statistics (linear inputs, K and V)
    kv.py          KV-cache qparams and the evaluation fake-quant hook
    awq.py         AWQ scale + clip search (plain data out) and its `apply`
    gptq.py        GPTQ: error-feedback int4 codes per linear (after the AWQ scales, or alone)
    w4.py          group-wise integer weight quantization, AutoAWQ pack / unpack
"""
