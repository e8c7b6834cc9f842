"""Weight quantization math, AutoAWQ pack/unpack (bit-exact, odd shapes), AWQ apply, group-size checks."""
import pytest
import torch

from pipeline.models.llama import Block, ModelArgs, rope_cos_sin
from pipeline.quant import awq
from pipeline.quant.w4 import AWQ_ORDER, check_group_size, dequantize, fake_quant, pack, quantize, unpack


def naive_awq_pack(cols: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's documented rule, one value at a time: nibble i of int32 c holds column 8c + ORDER[i]."""
    R, N = cols.shape
    out = torch.zeros(R, (N + 7) // 8, dtype=torch.int64)
    for r in range(R):
        for c in range(out.shape[1]):
            word = 0
            for i, j in enumerate(AWQ_ORDER):
                v = int(cols[r, 8 * c + j]) if 8 * c + j < N else 0
                word |= v << (4 * i)
            out[r, c] = word - (1 << 32) if word >= 1 << 31 else word
    return out.to(torch.int32)


@pytest.mark.parametrize("N,K,g,bits,zp", [(24, 64, 32, 4, True), (36, 96, 32, 4, False), (13, 128, 64, 4, True),
                                           (40, 64, 32, 3, True), (20, 64, 32, 8, True)])
def test_pack_unpack_roundtrip_bit_exact(N, K, g, bits, zp):
    torch.manual_seed(0)
    w = torch.randn(N, K)
    q, s, z = quantize(w, bits, g, zp)
    assert q.shape == (N, K) and s.shape == (K // g, N) and z.shape == (K // g, N)
    assert int(q.max()) < 2 ** bits and s.dtype == torch.float16
    t = pack(q, s, z, bits)
    per = 8 if bits <= 4 else 4
    assert t["qweight"].shape == (K, -(-N // per)) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (K // g, -(-N // per))
    q2, s2, z2 = unpack(t["qweight"], t["qzeros"], t["scales"], bits)
    assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s)
    if bits <= 4:
        assert torch.equal(t["qweight"], naive_awq_pack(q.T)) and torch.equal(t["qzeros"], naive_awq_pack(z))


def test_fake_quant_matches_dequantized_codes_and_error_bound():
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    q, s, z = quantize(w, 4, 64, True)
    wh = dequantize(q, s, z, 64)
    assert torch.equal(wh, fake_quant(w, 4, 64, True))
    step = s.T.float().repeat_interleave(64, 1)                                  # (N, K)
    assert ((w - wh).abs() <= step * 0.5 + 1e-6).all()                          # no clipping: half a step
    clip = torch.full((32, 2), 0.7)
    assert (fake_quant(w, 4, 64, True, clip) - w).abs().max() > (wh - w).abs().max()


def test_group_size_refused_naming_the_layer():
    args = ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536)
    check_group_size(args, 64)
    with pytest.raises(ValueError, match=r"group_size=128 .* 576 .*layers\.\*\.q.*\[32, 64\]"):
        check_group_size(args, 128)


def test_awq_apply_is_exact_in_real_arithmetic():
    """Folding arbitrary scales (GQA, o folded into v per KV group) leaves the block's function unchanged."""
    torch.manual_seed(2)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, qkv_bias=True)
    block = Block(args).double().eval()
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=0.2)
    t = {f"layers.0.{k}": v.clone() for k, v in block.state_dict().items()}
    res = {f"layers.0.{g}.scale": torch.rand(n).double() + 0.5
           for g, n in (("qkv", 64), ("o", 64), ("gate_up", 64), ("down", 96))}
    res["layers.0.o.scale"] = awq.kv_shared(res["layers.0.o.scale"], args)
    t = awq.apply(t, 0, res, args)
    block2 = Block(args).double().eval()
    block2.load_state_dict({k[len("layers.0."):]: v for k, v in t.items()})
    x = torch.randn(2, 8, 64).double()
    cos, sin = rope_cos_sin(args, torch.arange(8))
    torch.testing.assert_close(block2(x, cos.double(), sin.double()), block(x, cos.double(), sin.double()))
    assert not torch.allclose(block2.q.weight, block.q.weight)
