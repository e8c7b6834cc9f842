"""What a wheel install ships: every file the package reads at run time is in pyproject's package data (the C
kernels' sources and headers, which cpu_build compiles on the user's machine; the chat page's static files).
An editable install (the test suite's) reads them from the checkout and would not notice a missing one."""
from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_runtime_files_are_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, folder in (("pipeline.kernels", "csrc"), ("pipeline.server", "static")):
        root = REPO / package.replace(".", "/")
        files = [p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file()]
        assert files, f"{root / folder} is empty"
        missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in data.get(package, []))]
        assert not missing, f"not in [tool.setuptools.package-data] {package!r}: {missing}"
