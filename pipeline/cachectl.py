"""List and clean the artifact cache (pipeline/cache.py).

    python -m pipeline.cachectl ls [OVERRIDES]               # every entry: stage, key, size, age, state, named?
    python -m pipeline.cachectl rm STAGE [KEY] [OVERRIDES]   # one stage's entries, all or one key
    python -m pipeline.cachectl gc [--dry-run] [OVERRIDES]   # entries that no given config names

OVERRIDES are the runner's Hydra overrides (`cache_dir=/shared/cache model=tiny-random quant=fp16,kv8`); they
pick the cache (`cache_dir`) and, for `gc` and ls's `named` column, the configs whose entries are kept. Comma
lists expand as a multirun's would (`quant=fp16,kv8,w4a16` is three configs); no overrides: the default config.

An entry is *named* by a config when it is one of the (stage, key) pairs of that config's plan: the stages
its `pipeline.targets` need, with their keys (what `pipeline.dry_run=true` prints). `gc` removes every entry,
and every temp folder a killed run left, that none of the given configs names, entries of stages that no
longer exist included. An entry whose key lock a live process holds (it is being computed) is never removed;
removal takes that lock, renames the entry aside and deletes it, so a run never sees half an entry. Runs only
lock what they compute, not what they read: run `gc` when no job of another config is running, or name
those configs too.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .cache import Cache


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    kind: str                     # entry | temp (a run's unfinished folder) | trash (being deleted)
    size: int
    age_s: float
    state: str = ""               # complete | incomplete: ... | corrupt: ... | stale: ... (entries)
    owner: Optional[dict] = None  # live holder of the key's lock


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def entries(cache: Cache, verify: str = "size") -> list[Entry]:
    """Every entry, temp and trash folder under the cache root, by stage then key."""
    out: list[Entry] = []
    if not cache.root.is_dir():
        return out
    now = time.time()
    for sdir in sorted(p for p in cache.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for d in sorted(p for p in sdir.iterdir() if p.is_dir() and p.name != ".locks"):
            kind, key = "entry", d.name
            for prefix in (".tmp-", ".trash-"):
                if d.name.startswith(prefix):
                    kind, key = prefix.strip(".-"), d.name[len(prefix):].rsplit("-", 1)[0]
            kind = {"tmp": "temp"}.get(kind, kind)
            e = Entry(sdir.name, key, d, kind, folder_size(d), now - d.stat().st_mtime)
            if kind == "entry":
                man, why = cache.check(sdir.name, key, verify=verify)
                e.state = "complete" if man else why
                if man and man.get("created"):
                    e.age_s = now - float(man["created"])
            if kind != "trash":
                e.owner = cache.lock_owner(sdir.name, key)
            out.append(e)
    return out


def compose_configs(overrides: list[str]) -> list:
    """The configs the overrides describe (comma lists expand as in a multirun), paths made absolute as the
    runner makes them, so keys match the runner's."""
    from hydra import compose, initialize_config_dir
    from .report import sweep_jobs
    from .runner import CONF_DIR, absolutize
    cfgs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in sweep_jobs(overrides):
            cfg = compose("config", overrides=job)
            absolutize(cfg, Path.cwd())
            cfgs.append(cfg)
    return cfgs


def named_keys(cfgs: list) -> set[tuple[str, str]]:
    from . import graph
    return {(st.name, st.key) for cfg in cfgs for st in graph.plan(cfg)}


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_age(s: float) -> str:
    s = max(s, 0)
    return (f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h" if s < 172800
            else f"{s / 86400:.1f} d")


def describe(e: Entry) -> str:
    what = e.state if e.kind == "entry" else {"temp": "temp folder of an unfinished run",
                                             "trash": "being deleted"}[e.kind]
    if e.owner:
        what += f" (locked: being computed by pid {e.owner.get('pid')} on {e.owner.get('host')})"
    return what


def remove(cache: Cache, found: list[Entry], dry_run: bool, say=print) -> int:
    """Remove the given entries (by key: an entry and its temp folders go together); 1 if any was locked."""
    refused = 0
    for stage, key in dict.fromkeys((e.stage, e.key) for e in found if e.kind != "trash"):
        size = sum(e.size for e in found if (e.stage, e.key) == (stage, key))
        if dry_run:
            owner = cache.lock_owner(stage, key)
            say(f"would remove {stage}/{key} ({human_size(size)})" if owner is None else
                f"would keep {stage}/{key}: locked by pid {owner.get('pid')} on {owner.get('host')}")
            continue
        owner = cache.remove(stage, key)
        if owner is None:
            say(f"removed {stage}/{key} ({human_size(size)})")
        else:
            refused = 1
            say(f"kept {stage}/{key}: locked by pid {owner.get('pid')} on {owner.get('host')} (being computed)")
    for e in found:
        if e.kind == "trash":
            if not dry_run:
                shutil.rmtree(e.path, ignore_errors=True)
            say(f"{'would remove' if dry_run else 'removed'} {e.stage}/{e.path.name} (left by a deletion)")
    return refused


def main(argv: Optional[list[str]] = None, say=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.cachectl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["ls", "rm", "gc"])
    ap.add_argument("args", nargs="*", help="rm: STAGE [KEY]; then Hydra overrides (key=value)")
    ap.add_argument("--dry-run", action="store_true", help="rm, gc: list what would be removed, remove nothing")
    ap.add_argument("--verify", action="store_true", help="ls: check sha256 checksums too (default: sizes)")
    a = ap.parse_intermixed_args(argv)
    positional = [x for x in a.args if "=" not in x]
    overrides = [x for x in a.args if "=" in x]
    if a.command == "rm" and not 1 <= len(positional) <= 2:
        ap.error("rm takes STAGE [KEY]")
    if a.command != "rm" and positional:
        ap.error(f"{a.command} takes only overrides (key=value), not {positional}")
    cfgs = compose_configs(overrides)
    roots = {str(c.cache_dir) for c in cfgs}
    if len(roots) > 1:
        ap.error(f"the overrides name several caches: {sorted(roots)}")
    cache = Cache(Path(roots.pop()), stale_after=float(cfgs[0].lock_stale_after))
    found = entries(cache, verify="full" if a.verify else "size")

    if a.command == "ls":
        named = named_keys(cfgs)
        total = sum(e.size for e in found)
        say(f"cache {cache.root}: {sum(e.kind == 'entry' for e in found)} entries, {human_size(total)}; "
            f"named = in the plan of {'the default config' if not overrides else ' '.join(overrides)}")
        w = max([len(e.stage) for e in found] + [5])
        say(f"  {'stage':<{w}}  {'key':<16}  {'size':>9}  {'age':>7}  named  state")
        for e in found:
            key = e.key if e.kind == "entry" else e.path.name
            say(f"  {e.stage:<{w}}  {key:<16}  {human_size(e.size):>9}  {human_age(e.age_s):>7}  "
                f"{'yes' if (e.stage, e.key) in named and e.kind == 'entry' else 'no':<5}  {describe(e)}")
        return 0
    if a.command == "rm":
        stage, key = positional[0], (positional[1] if len(positional) > 1 else None)
        picked = [e for e in found if e.stage == stage and (key is None or e.key == key)]
        if not picked:
            say(f"nothing to remove: no entry {stage}/{key or '*'} in {cache.root}")
            return 1 if key else 0
        return remove(cache, picked, a.dry_run, say)
    named = named_keys(cfgs)
    picked = [e for e in found if (e.stage, e.key) not in named]
    say(f"gc {cache.root}: keeping {sum(e.kind == 'entry' for e in found) - sum(e.kind == 'entry' for e in picked)} "
        f"entries named by {len(cfgs)} config(s); {'would remove' if a.dry_run else 'removing'} "
        f"{len(picked)} folder(s), {human_size(sum(e.size for e in picked))}")
    return remove(cache, picked, a.dry_run, say)


if __name__ == "__main__":
    sys.exit(main())
