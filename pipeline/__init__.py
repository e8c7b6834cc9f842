"""A declarative quantize-and-serve pipeline for LLMs (see README.md)."""
__version__ = "0.1.0"
