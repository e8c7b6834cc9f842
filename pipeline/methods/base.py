"""What a quantization method declares: the stages it needs, its config checks, its artifact reader and how
it applies to the reference model for evaluation. Weight methods and KV methods are chosen independently
(`pipeline.methods.select`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


class WeightMethod:
    name: str = ""
    stages: tuple[str, ...] = ()        # stages that make its weights, upstream first (load is always there)
    artifact: Optional[str] = None      # the stage whose artifact evaluate and turbomind read (None: load's)
    kv_qparams_from: str = "kv_qparams"  # the stage writing static KV qparams that fit these weights
    weight_type: Optional[str] = None   # what `read` serves: a row of pipeline.weights.WEIGHT_TYPES (None: 16-bit)

    def matches(self, q) -> bool:
        """Does the quant config q select this method?"""
        raise NotImplementedError

    def validate(self, cfg) -> None:
        """Refuse a bad config before anything runs (called while the graph is planned)."""

    def served(self, q) -> bool:
        """Does the serving engine have a kernel path for these weights?"""
        return True

    def apply(self, model, inputs: dict[str, Path]) -> None:
        """Put the method's weights into the reference model (evaluate); inputs: stage -> artifact folder."""

    def read(self, inputs: dict[str, Path], args, device) -> tuple[dict, Optional[dict], Optional[str]]:
        """The weights for the workspace writer: (canonical tensors, the quantized linears or None, their weight
        type: a row of pipeline.weights.WEIGHT_TYPES, or None for 16-bit linears in the tensors)."""
        raise NotImplementedError


class KvMethod:
    name: str = ""
    stages: tuple[str, ...] = ()

    def matches(self, q) -> bool:
        raise NotImplementedError

    def validate(self, cfg) -> None:
        pass

    def apply(self, model, q, kv_dir: Optional[Path]) -> None:
        """Quantize the reference model's K and V the way the engine will (evaluate)."""

    def read(self, kv_dir: Optional[Path], args, q) -> Optional[dict]:
        """Static qparams for the workspace writer: layer -> (k_scale, k_zp, v_scale, v_zp), or None."""
        return None
