"""Serving engine over a TurboMind-style workspace (see engine.py for the step loop, docs/engine-api.md for the API)."""
from .engine import Engine
from .params import GenerationOutput, SamplingParams

__all__ = ["Engine", "SamplingParams", "GenerationOutput"]
