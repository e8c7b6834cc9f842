"""Serving engine over a TurboMind-style workspace (see engine.py for the step loop, ENGINE_API.md for the API)."""
from .engine import Engine
from .params import GenerationOutput, SamplingParams

__all__ = ["Engine", "SamplingParams", "GenerationOutput"]
