"""SmoothQuant W8A8: migration scales from calibration statistics (smooth), folded, then int8 weights per output
channel with dynamic per-token int8 activations (quant_w8). Artifact: pipeline/artifacts/w8a8.py, which also
holds the static KV qparams of the smoothed model."""
from __future__ import annotations

from ..artifacts.w8a8 import apply_w8a8, read_quant_w8
from ..quant.smooth import check_alpha, check_grid
from .base import WeightMethod


class SmoothQuant(WeightMethod):
    name = "smoothquant"
    stages = ("calibrate", "smooth", "quant_w8")
    artifact = "quant_w8"
    kv_qparams_from = "quant_w8"
    weight_type = "int8"

    def matches(self, q) -> bool:
        return q.a_bits is not None

    def validate(self, cfg) -> None:
        q = cfg.quant
        if q.a_bits != 8 or q.w_bits != 8:
            raise ValueError(f"quant_w8 makes W8A8: needs quant.w_bits=8 and quant.a_bits=8, got "
                             f"w_bits={q.w_bits}, a_bits={q.a_bits}")
        check_alpha(q.smooth_alpha)
        if q.smooth_search:
            check_grid(q.smooth_grid)
            if q.search_samples < 1:
                raise ValueError(f"quant.search_samples={q.search_samples} must be >= 1 for quant.smooth_search=true")

    def apply(self, model, inputs) -> None:
        apply_w8a8(model, inputs["quant_w8"])

    def read(self, inputs, args, device):
        tensors, w8 = read_quant_w8(inputs["quant_w8"], inputs["load"], args)
        return tensors, w8, self.weight_type
