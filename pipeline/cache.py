"""Content-keyed artifact cache: keys, manifests with checksums, atomic commits, per-key locks.

Layout:  <root>/<stage>/<key>/{files..., manifest.json}
         <root>/<stage>/.locks/<key>.lock          (owner pid/host/time; heartbeat = mtime)
An artifact is used only when its manifest parses and every file matches its size and sha256;
anything else (missing, partial, corrupt) is a miss and is recomputed. `python -m pipeline.cachectl`
lists and removes entries (pipeline/cachectl.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-able object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_key(name: str, version: int, config: dict, upstream: dict[str, str]) -> str:
    return stable_hash({"stage": name, "version": version, "config": config, "upstream": upstream})[:16]


def save_safetensors(tensors: dict, path, metadata: Optional[dict] = None) -> None:
    """safetensors.torch.save_file, then the header's `__metadata__` rewritten with sorted keys: safetensors
    writes that map from a Rust HashMap, in an order that changes from run to run, so equal tensors and
    metadata gave files with different bytes (and checksums). Tensor entries keep safetensors' own order."""
    from safetensors.torch import save_file
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    if not metadata:
        return
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(blob) <= n:  # the same entries reordered: the same length, rewritten in place
            f.seek(8)
            f.write(blob + b" " * (n - len(blob)))
            return
    # escaped differently from safetensors' writer: a longer header, so the file is written again
    blob += b" " * (-(8 + len(blob)) % 8)
    tmp = path.with_name(path.name + ".sorting")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(8 + n)
        dst.write(len(blob).to_bytes(8, "little") + blob)
        shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Cache:
    def __init__(self, root: Path, verify: str = "full", stale_after: float = 120.0):
        if verify not in ("full", "size"):
            raise ValueError(f"verify={verify!r} is not one of 'full', 'size'")
        self.root, self.verify, self.stale_after = Path(root), verify, stale_after

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / stage / ".locks" / f"{key}.lock"

    def check(self, stage: str, key: str, verify: Optional[str] = None) -> tuple[Optional[dict], str]:
        """(manifest, "") for a complete, intact artifact, else (None, why not): "no entry", "incomplete: ...",
        "stale: ..." (another cache format) or "corrupt: ...". verify: full | size (default: the cache's)."""
        d = self.path(stage, key)
        if not d.is_dir():
            if any((self.root / stage).glob(f".tmp-{key}-*")):
                return None, "incomplete: only a temp folder (a run computing it now, or one that was killed)"
            return None, "no entry"
        try:
            man = json.loads((d / MANIFEST).read_text())
        except OSError:
            return None, "incomplete: no manifest.json"
        except ValueError:
            return None, "corrupt: manifest.json does not parse"
        if man.get("format_version") != FORMAT_VERSION:
            return None, f"stale: cache format version {man.get('format_version')}, this code reads {FORMAT_VERSION}"
        if man.get("key") != key or man.get("stage") != stage:
            return None, f"corrupt: its manifest names {man.get('stage')}/{man.get('key')}"
        for rel, meta in man.get("files", {}).items():
            f = d / rel
            try:
                size = f.stat().st_size
            except OSError:
                return None, f"corrupt: {rel} is missing"
            if size != meta["size"]:
                return None, f"corrupt: {rel} has the wrong size"
            if (verify or self.verify) == "full" and file_sha256(f) != meta["sha256"]:
                return None, f"corrupt: {rel} fails its checksum"
        return man, ""

    def lookup(self, stage: str, key: str) -> Optional[dict]:
        """The manifest of a complete, intact artifact, or None (a miss)."""
        man, why = self.check(stage, key)
        if man is None and why.startswith("corrupt"):
            log.warning("cache %s/%s: %s: recomputing", stage, key, why.partition(": ")[2])
        return man

    def lock_owner(self, stage: str, key: str) -> Optional[dict]:
        """Who holds key's lock ({pid, host, ...}) while a live process holds it, else None."""
        return KeyLock(self.lock_path(stage, key), self.stale_after).live_owner()

    def remove(self, stage: str, key: str) -> Optional[dict]:
        """Delete key's entry (and temp folders left for it) unless a live process holds its lock: then return
        that owner and delete nothing. Atomic per entry: renamed aside under the lock, then removed."""
        lk = KeyLock(self.lock_path(stage, key), self.stale_after)
        if not lk.acquire(blocking=False):
            return lk.live_owner() or {"pid": None, "host": None}
        try:
            final = self.path(stage, key)
            if final.exists():
                trash = final.with_name(f".trash-{key}-{uuid.uuid4().hex[:8]}")
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            self.clear_tmp(stage, key)
        finally:
            lk.release()
        return None

    def new_tmp(self, stage: str, key: str) -> Path:
        tmp = self.root / stage / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def clear_tmp(self, stage: str, key: str) -> None:
        """Remove temp folders left for this key by killed runs. Call only while holding the key's lock:
        only the lock holder writes `.tmp-<key>-*`."""
        for old in (self.root / stage).glob(f".tmp-{key}-*"):
            log.info("cache %s/%s: removing %s left by an interrupted run", stage, key, old.name)
            shutil.rmtree(old, ignore_errors=True)

    def commit(self, stage: str, key: str, tmp: Path, info: dict) -> dict:
        """Checksum and fsync tmp's files, write the manifest, and rename tmp into place atomically."""
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # data on disk before the manifest that vouches for it
            finally:
                os.close(fd)
        man = {"format_version": FORMAT_VERSION, "stage": stage, "key": key, "created": time.time(),
               "files": files, **info}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(man, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        final = self.path(stage, key)
        if final.exists():  # a corrupt or partial earlier artifact: move it aside, then replace
            trash = final.with_name(f".trash-{key}-{uuid.uuid4().hex[:8]}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            # another process committed this key meanwhile (only after a wrongly taken-over lock):
            # keep the intact one, drop ours
            theirs = self.lookup(stage, key)
            if theirs is None:
                raise
            log.warning("cache %s/%s: committed concurrently by another process; keeping theirs", stage, key)
            shutil.rmtree(tmp, ignore_errors=True)
            return theirs
        return man

    @contextmanager
    def lock(self, stage: str, key: str, on_wait=None):
        lk = KeyLock(self.lock_path(stage, key), self.stale_after)
        lk.acquire(on_wait)
        try:
            self.clear_tmp(stage, key)
            yield
        finally:
            lk.release()


def host_id() -> dict:
    """Who may judge a pid: the same hostname AND the same kernel boot AND the same pid namespace
    (two containers can share a hostname and a filesystem but not pids)."""
    ident = {"host": socket.gethostname()}
    try:
        ident["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ident["pidns"] = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pass
    return ident


class KeyLock:
    """An exclusive lock file that survives its holder's death.

    The holder writes {pid, host, boot, pidns, token} and touches the file every `stale_after/6` s. A
    waiter takes the lock over when the holder is a dead process on this host (same hostname, boot and
    pid namespace), or when the heartbeat is older than `stale_after` (another host, e.g. a cluster job
    on a shared filesystem; a frozen process; a holder killed before it wrote its name). Never waits
    forever on a dead holder. Hosts sharing a filesystem need clocks within a fraction of stale_after.
    """

    def __init__(self, path: Path, stale_after: float = 120.0):
        self.path, self.stale_after = Path(path), stale_after
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _owner(self) -> Optional[dict]:
        """The lock file's content plus its mtime; {"mtime"} alone while it is empty or unreadable
        (being written, or its writer died first); None when there is no lock file."""
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text()
        except OSError:
            return None
        try:
            owner = json.loads(text)
        except ValueError:
            owner = {}
        return (owner if isinstance(owner, dict) else {}) | {"mtime": mtime}

    def _is_stale(self, owner: dict) -> bool:
        me = host_id()
        if "pid" in owner and all(owner.get(k) == v for k, v in me.items()):
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError):
                pass
        return time.time() - owner["mtime"] > self.stale_after

    def live_owner(self) -> Optional[dict]:
        """The lock file's owner while it is held and not stale, else None."""
        owner = self._owner()
        return owner if owner is not None and not self._is_stale(owner) else None

    def _break(self, owner: dict) -> None:
        """Remove a stale lock, guarded by a short-lived break file so two waiters cannot both break."""
        guard = self.path.with_suffix(".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 30:
                    guard.unlink()
            except OSError:
                pass
            return
        try:
            now = self._owner()
            if now is not None and now.get("token") == owner.get("token"):
                log.warning("taking over a stale lock %s held by pid %s on %s", self.path.name,
                            owner.get("pid"), owner.get("host"))
                self.path.unlink()
        finally:
            os.close(fd)
            guard.unlink()

    def acquire(self, on_wait=None, blocking: bool = True) -> bool:
        """Take the lock (waiting for a live holder); with blocking=False, return False instead of waiting."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and self._is_stale(owner):
                    self._break(owner)
                    continue
                if not blocking:
                    return False
                if not told and owner is not None and "pid" in owner and on_wait:
                    on_wait(owner)
                    told = True
                time.sleep(0.2)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), **host_id(), "token": self.token, "since": time.time()}, fh)
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
            return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.stale_after / 6, 0.05)):
            owner = self._owner()
            if owner is None or owner.get("token") != self.token:
                log.warning("lock %s was taken over by pid %s on %s (this process looked stale)", self.path.name,
                            (owner or {}).get("pid"), (owner or {}).get("host"))
                return
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat:
            self._beat.join()
        owner = self._owner()
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)
