"""A declarative quantize-and-serve pipeline for LLMs (see README.md)."""
import os

# GNU OpenMP's worker threads spin between parallel regions by default; on a small CPU they take the cores from the
# next op's workers (and from other processes): the torch-native CPU backend decoded 2-3x slower with spinning
# workers on a 2-core machine. Read when torch loads libgomp, so it is set before anything imports torch; an
# explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

__version__ = "0.1.0"
