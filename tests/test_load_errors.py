"""Bad input ends in one clear paragraph naming the bad value, and leaves the cache untouched."""
from __future__ import annotations

import json

import pytest

from conftest import compose


def no_artifacts(cache):
    return not cache.exists() or not list(cache.rglob("manifest.json"))


def test_model_path_missing(cli):
    p = cli("model=llama2-7b-chat", "model.path=/nonexistent/llama", check=False)
    assert p.returncode != 0
    assert "model.path='/nonexistent/llama' does not exist" in p.stdout
    assert "resume with: python -m pipeline.runner" in p.stdout
    assert no_artifacts(cli.tmp / "cache")


def test_folder_without_weights(cli, tmp_path):
    d = tmp_path / "empty_model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                                               "num_attention_heads": 2, "num_hidden_layers": 1,
                                               "intermediate_size": 16, "vocab_size": 10}))
    p = cli("model=llama2-7b-chat", f"model.path={d}", check=False)
    assert p.returncode != 0 and "holds no weights" in p.stdout and str(d) in p.stdout
    assert no_artifacts(cli.tmp / "cache")


def test_unsupported_architecture(cli, tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    p = cli("model=llama2-7b-chat", f"model.path={d}", check=False)
    assert p.returncode != 0
    assert "unsupported architecture" in p.stdout and "GPT2LMHeadModel" in p.stdout and "internlm2" in p.stdout
    assert no_artifacts(cli.tmp / "cache")


def test_gguf_that_is_not_gguf(cli, tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    p = cli("model.source=gguf", f"model.path={f}", check=False)
    assert p.returncode != 0 and "is not a GGUF file" in p.stdout and "fake.gguf" in p.stdout
    assert no_artifacts(cli.tmp / "cache")


@pytest.mark.parametrize("override,needle", [
    ("quant.grup_size=64", "grup_size"),
    ("eval.windows=many", "eval.windows"),
    ("model.source=hub", "model.source='hub'"),
    ("quant.w_bits=3", "(w_bits=3, a_bits=None): the serving engine"),
])
def test_bad_config_values(override, needle):
    """Checked in-process: Hydra's compose with the schema, then the checks the runner makes before any stage runs."""
    with pytest.raises(Exception) as e:
        compose("model=tiny-random", override)
    assert needle in str(e.value)


def test_bad_config_value_end_to_end(cli):
    """The same error path through a real runner process: non-zero exit, the message, the resume command, no artifact."""
    p = cli("model=tiny-random", "quant.w_bits=3", check=False)
    assert p.returncode != 0
    assert "(w_bits=3, a_bits=None): the serving engine" in p.stdout + p.stderr
    assert "resume with: python -m pipeline.runner" in p.stdout
    assert no_artifacts(cli.tmp / "cache")
