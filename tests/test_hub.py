"""model.path=org/name: resolved offline from a Hugging Face cache in the Hub's own layout (built here), a
revision, a local folder winning over an id, and the error for an id neither cached nor reachable. The runner
on a Hub id (offline, a GPTQ tiny-random in such a cache): tests/test_prequant.py."""
from __future__ import annotations

import pytest

from hf_folders import hub_cache, write_hf_folder
from pipeline.models.hub import resolve


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    write_hf_folder(tmp_path / "src")
    snap = hub_cache(cache, "tiny-org/tiny-llama", tmp_path / "src")
    hub_cache(cache, "tiny-org/tiny-llama", tmp_path / "src", commit="f" * 40, ref="v1")
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    return env, snap


def test_resolve_revision_local_folder_first_and_the_error(offline_cache, tmp_path, monkeypatch):
    env, snap = offline_cache
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import importlib

    import huggingface_hub.constants
    importlib.reload(huggingface_hub.constants)         # the constants read the environment at import
    try:
        assert resolve("tiny-org/tiny-llama") == snap
        assert resolve("tiny-org/tiny-llama", revision="v1").name == "f" * 40
        with pytest.raises(ValueError) as e:            # neither cached nor reachable (offline)
            resolve("tiny-org/missing", revision="v2")
        msg = str(e.value)
        assert "model.path='tiny-org/missing' (model.revision='v2') is not a local folder" in msg
        assert "HF_HUB_OFFLINE=1" in msg and "hf download tiny-org/missing --revision v2" in msg
        local = tmp_path / "tiny-org" / "tiny-llama"      # an existing relative folder wins over the id
        write_hf_folder(local)
        monkeypatch.chdir(tmp_path)
        assert resolve("tiny-org/tiny-llama").resolve() == local.resolve()
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
