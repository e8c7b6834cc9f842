"""KV-cache quantization: none (16-bit), static (calibrated zp/scale per layer and KV head, int8 or int4) and
dynamic (per token at run time, int8 or int4). Bits: quant.kv_bits; symmetric: quant.kv_sym."""
from __future__ import annotations

from ..artifacts.kv_qparams import check, read_static
from ..quant.kv import attach_kv_fake_quant, check_kv
from .base import KvMethod


class NoKV(KvMethod):
    name = "none"

    def matches(self, q) -> bool:
        return not q.kv_bits


class StaticKV(KvMethod):
    name = "static"
    stages = ("calibrate", "kv_qparams")

    def matches(self, q) -> bool:
        return bool(q.kv_bits) and q.kv_mode == "static"

    def validate(self, cfg) -> None:
        check_kv(cfg.quant)

    def apply(self, model, q, kv_dir) -> None:
        if kv_dir is not None:
            check(kv_dir)
        attach_kv_fake_quant(model, q, kv_dir)

    def read(self, kv_dir, args, q):
        return read_static(kv_dir, args.n_layers, q.kv_bits, q.kv_sym)


class DynamicKV(StaticKV):
    name = "dynamic"
    stages = ()

    def matches(self, q) -> bool:
        return bool(q.kv_bits) and q.kv_mode == "dynamic"

    def read(self, kv_dir, args, q):
        return None
