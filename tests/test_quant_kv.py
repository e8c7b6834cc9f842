"""KV qparams from statistics and the evaluation hooks (static and dynamic)."""
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from pipeline.models.llama import ModelArgs, Transformer
from pipeline.quant.kv import FILE, attach_kv_fake_quant, kv_qparams
from pipeline.quant.stats import KVStats


def stats_for(k, v):
    obs = KVStats()
    obs(k, v)
    return {f"layers.0.{n}": t for n, t in obs.acc.items()}


def test_qparams_formulas():
    torch.manual_seed(0)
    k, v = torch.randn(2, 4, 16, 8) * 3 + 1, torch.randn(2, 4, 16, 8)          # (B, nkv, T, hd)
    qp = kv_qparams(stats_for(k, v), 1)
    kmin, kmax = k.amin((0, 2, 3)), k.amax((0, 2, 3))
    torch.testing.assert_close(qp["layers.0.k.int8.asym.scale"], (kmax - kmin) / 255)
    torch.testing.assert_close(qp["layers.0.k.int8.asym.zp"], (kmax + kmin) / 2)
    torch.testing.assert_close(qp["layers.0.v.int4.sym.scale"], v.abs().amax((0, 2, 3)) / 7)


@pytest.mark.parametrize("mode,bits,tol", [("static", 8, 0.02), ("static", 4, 0.3), ("dynamic", 8, 0.02)])
def test_attach_kv_fake_quant_changes_little(tmp_path, mode, bits, tol):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=100)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 100, (2, 32))
    ref = model(tokens)
    obs = [KVStats() for _ in model.layers]
    for b, o in zip(model.layers, obs):
        b.kv_observer = o
    model(tokens)
    stats = {f"layers.{i}.{n}": t for i, o in enumerate(obs) for n, t in o.acc.items()}
    for b in model.layers:
        b.kv_observer = None
    save_file(kv_qparams(stats, 2), str(tmp_path / FILE))
    q = OmegaConf.create({"kv_bits": bits, "kv_mode": mode, "kv_sym": False})
    attach_kv_fake_quant(model, q, tmp_path if mode == "static" else None)
    out = model(tokens)
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < tol
