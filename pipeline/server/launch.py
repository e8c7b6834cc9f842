"""Start the API server as a real process, for tests and bench/serve.py:

    s = ApiServer(workdir, "model=tiny-random", "serve.session_len=256").start()   # free port from its log
    s = ApiServer.for_workspace(workdir, ws, "--max-batch-size", "8").start()   # python -m pipeline.serve
    s.url, s.health(), s.wait_idle(free_blocks), s.rss(), s.stop()

Runs `python -m pipeline.runner pipeline=serve serve.mode=api serve.api.port=0 ...` (or `python -m
pipeline.serve WORKSPACE --port 0 ...`) on 127.0.0.1.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(r"API server listening on (https?://127\.0\.0\.1:\d+)")


class ApiServer:
    def __init__(self, workdir: Path, *overrides: str, cache_dir: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "server.log"
        cache = cache_dir or (self.workdir / "cache")
        self.cmd = [sys.executable, "-m", "pipeline.runner", "pipeline=serve", "serve.mode=api", "serve.api.port=0",
                    f"cache_dir={cache}", f"hydra.run.dir={self.workdir / 'run'}", *overrides]
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.env: dict = {}
        self.verify = True        # httpx's: an ssl.SSLContext trusting a server's own TLS certificate

    @classmethod
    def for_workspace(cls, workdir: Path, workspace: Path, *flags: str, env: dict | None = None) -> "ApiServer":
        """`python -m pipeline.serve WORKSPACE --port 0 *flags`, with `env` added to this process's environment."""
        s = cls(workdir)
        s.cmd = [sys.executable, "-m", "pipeline.serve", str(workspace), "--port", "0", *flags]
        s.env = dict(env or {})
        return s

    def start(self, timeout: float = 600) -> "ApiServer":
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            m = URL_LINE.search(self.log())
            if m:
                self.url = m.group(1)
                try:
                    if httpx.get(self.url + "/health", timeout=2, verify=self.verify).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not up after {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", timeout=10, verify=self.verify)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, free_blocks: int, timeout: float = 30) -> dict:
        """Poll /health until nothing runs or waits and free_blocks is back to `free_blocks`."""
        t0 = time.time()
        while True:
            h = self.health()
            if h["free_blocks"] == free_blocks and h["running"] == 0 and h["waiting"] == 0:
                return h
            if time.time() - t0 > timeout:
                raise AssertionError(f"server not idle after {timeout} s: {h} (want free_blocks={free_blocks})")
            time.sleep(0.05)

    def rss(self) -> int:
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
