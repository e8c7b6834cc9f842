"""Child processes of the engine (the engine core, tensor-parallel ranks): how their end is told, and how they
follow their parent's."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
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


def watch_parent(parent: int, gone: str) -> None:
    """Exit this process (status 1, printing `gone` to stderr) within 0.5 s of its parent `parent` ending:
    a child never outlives the process that drives it. Runs in a daemon thread."""
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                print(gone, file=sys.stderr, flush=True)
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()
