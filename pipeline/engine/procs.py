"""Child processes of the engine (the engine core, tensor-parallel ranks): how their end is told to a user."""
from __future__ import annotations

import signal
from typing import Optional


def exit_text(code: Optional[int]) -> str:
    """A Popen returncode in words: "exited with status 1", "was killed by SIGKILL", "is still running"."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
