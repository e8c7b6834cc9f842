"""Workspace layout: TP shards reassemble exactly, config.ini round trip, HF and AutoAWQ folders, the stage."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.llama import ModelArgs
from pipeline.models.sources import synthetic_tensors
from pipeline.quant import w4 as awq_format
from pipeline.quant.w8 import W8Weight
from pipeline.workspace import WEIGHTS, config_args, load_tensor, read_config, reassemble, write_workspace

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=512, vocab_size=300,
                 max_seq_len=256, qkv_bias=True)
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def rand_w4(t, g=64):
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(ARGS.n_layers):
        for n in LINEARS:
            N, K = t[f"layers.{i}.{n}.weight"].shape
            out[f"layers.{i}.{n}"] = (torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8),
                                      torch.rand(K // g, N, generator=gen).half(),
                                      torch.randint(0, 16, (K // g, N), generator=gen).to(torch.uint8))
    return out


def rand_w8(t):
    gen = torch.Generator().manual_seed(1)
    return {f"layers.{i}.{n}": W8Weight(torch.randint(-127, 128, t[f"layers.{i}.{n}.weight"].shape, generator=gen,
                                                      dtype=torch.int8),
                                        torch.rand(t[f"layers.{i}.{n}.weight"].shape[0], generator=gen).half())
            for i in range(ARGS.n_layers) for n in LINEARS}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_reassemble_exactly(tmp_path, tp):
    t = synthetic_tensors(ARGS, 0, torch.float16)
    for i in range(ARGS.n_layers):
        for n in "qkv":
            t[f"layers.{i}.{n}.bias"] = torch.randn(t[f"layers.{i}.{n}.weight"].shape[0]).half()
    w4, w8 = rand_w4(t), rand_w8(t)
    kv = {i: tuple(torch.rand(ARGS.n_kv_heads) for _ in range(4)) for i in range(ARGS.n_layers)}
    for name, w in (("fp16", None), ("int4", w4), ("int8", w8)):
        ws = tmp_path / name
        write_workspace(ws, ARGS, t, None, tp=tp, w4=w if name == "int4" else None, w8=w if name == "int8" else None,
                        group_size=64, kv_qparams=kv, kv_bits=8)
        wdir = ws / WEIGHTS
        assert (wdir / f"layers.1.attention.w_qkv.{tp - 1}.{'qweight' if w else 'weight'}").exists()
        assert (wdir / f"layers.0.feed_forward.w2.{tp - 1}.{'scales' if w else 'weight'}").exists()
        c = read_config(ws)
        assert c["tensor_para_size"] == tp and c["quant_policy"] == 4 and c["weight_type"] == name
        assert config_args(c) == ARGS
        args, back = reassemble(ws)
        for k, v in t.items():
            base = k.rsplit(".", 1)[0]
            if name == "int8" and base in w8 and k.endswith(".weight"):
                assert isinstance(back[base], W8Weight) and back[base].qweight.dtype == torch.int8
                assert torch.equal(back[base].qweight, w8[base].qweight) and torch.equal(back[base].scales, w8[base].scales)
            elif w and base in w4 and k.endswith(".weight"):
                q, s, z = back[base]
                assert torch.equal(q, w4[base][0]) and torch.equal(s, w4[base][1])
                assert torch.equal(z.to(torch.uint8), w4[base][2])
            else:
                assert torch.equal(back[k], v), k
        for i in range(ARGS.n_layers):
            assert torch.equal(back[f"layers.{i}.past_kv_scale"], torch.stack(kv[i]))
        if name == "int8":   # column-parallel: N split with its scales; row-parallel: K split, all N scales
            F, D = ARGS.hidden_dim, ARGS.dim
            assert load_tensor(wdir, f"layers.0.feed_forward.w13.{tp - 1}.qweight").shape == (2 * F // tp, D)
            assert load_tensor(wdir, f"layers.0.feed_forward.w13.{tp - 1}.scales").shape == (2 * F // tp,)
            assert load_tensor(wdir, f"layers.0.feed_forward.w2.{tp - 1}.qweight").shape == (D, F // tp)
            assert torch.equal(load_tensor(wdir, f"layers.0.feed_forward.w2.{tp - 1}.scales"), w8["layers.0.down"].scales)


def test_bad_tp_names_the_limits(tmp_path):
    t = synthetic_tensors(ARGS, 0, torch.float16)
    with pytest.raises(ValueError, match="tp=3 does not fit n_heads=8.*valid tp values"):
        write_workspace(tmp_path, ARGS, t, None, tp=3)


def test_from_hf_fp16_and_autoawq_folders(tmp_path):
    from pipeline.engine import Engine, SamplingParams
    from pipeline.artifacts.workspace import from_hf_folder
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=300)
    t = synthetic_tensors(args, 0, torch.float16)
    hf = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "lm_head.weight": "lm_head.weight"}
    proj = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i in range(args.n_layers):
        hf[f"layers.{i}.attn_norm.weight"] = f"model.layers.{i}.input_layernorm.weight"
        hf[f"layers.{i}.mlp_norm.weight"] = f"model.layers.{i}.post_attention_layernorm.weight"
        hf.update({f"layers.{i}.{n}.weight": f"model.layers.{i}.{p}.weight" for n, p in proj.items()})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 300,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 256}
    (tmp_path / "hf").mkdir()
    save_file({hf[k]: v for k, v in t.items()}, str(tmp_path / "hf/model.safetensors"))
    (tmp_path / "hf/config.json").write_text(json.dumps(cfg))
    info = from_hf_folder(tmp_path / "hf", tmp_path / "ws16")
    assert info["weight_type"] == "fp16"
    _, back = reassemble(tmp_path / "ws16")
    assert all(torch.equal(back[k], v) for k, v in t.items())
    # AutoAWQ GEMM folder: qweight/qzeros/scales under the HF names
    awq, w4 = {}, {}
    gen = torch.Generator().manual_seed(1)
    for k, v in t.items():
        base = k.rsplit(".", 1)[0]
        if base.split(".")[-1] in proj:
            N, K = v.shape
            q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
            s, z = torch.rand(K // 64, N, generator=gen).half(), torch.randint(0, 16, (K // 64, N), generator=gen)
            w4[base] = (q, s, z)
            for part, x in awq_format.pack(q, s, z, 4).items():
                awq[hf[k].replace(".weight", "." + part)] = x
        else:
            awq[hf[k]] = v
    (tmp_path / "awq").mkdir()
    save_file(awq, str(tmp_path / "awq/model.safetensors"))
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True}
    (tmp_path / "awq/config.json").write_text(json.dumps(cfg))
    assert from_hf_folder(tmp_path / "awq", tmp_path / "ws4", tp=2)["weight_type"] == "int4"
    _, back = reassemble(tmp_path / "ws4")
    for base, (q, s, z) in w4.items():
        assert torch.equal(back[base][0], q) and torch.equal(back[base][2], z.half())
    eng = Engine.from_workspace(tmp_path / "ws4", "cpu", {"session_len": 64})
    assert len(eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]) == 4


def test_turbomind_stage_reads_only_quant_and_tp(cli):
    from pipeline.stages import turbomind
    assert turbomind.READS == ["quant", "serve.tp", "model.name"]
    p = cli("pipeline=serve", "model=tiny-random", "serve.max_new_tokens=4", "serve.prompts=[hi]")
    p2 = cli("pipeline=serve", "model=tiny-random", "serve.max_new_tokens=4", "serve.prompts=[hi]",
             "serve.session_len=128", "serve.max_batch_size=2")
    assert "turbomind" in p.stdout and "ran in" in p.stdout
    line = next(x for x in p2.stdout.splitlines() if "turbomind" in x)
    assert "cached" in line        # serving knobs do not rebuild the workspace


def test_int4_workspace_with_o_bias_needs_no_dense_weights(tmp_path):
    """InternLM-style o bias with int4 linears: the workspace is written from the quantized linears alone."""
    args = ModelArgs(**{**ARGS.__dict__, "o_bias": True})
    t = synthetic_tensors(args, 0, torch.float16)
    w4 = rand_w4(t)
    rest = {k: v for k, v in t.items() if not any(k.endswith(f".{n}.weight") for n in LINEARS)}
    write_workspace(tmp_path / "ws", args, rest, None, tp=2, w4=w4, group_size=64)
    back_args, back = reassemble(tmp_path / "ws")
    assert back_args.o_bias and torch.equal(back["layers.1.o.bias"], t["layers.1.o.bias"])


# ------------------------------------------------------------------------------------ format versions
def test_a_workspace_of_another_format_version_is_refused_naming_both_and_the_rebuild(tmp_path):
    from pipeline.artifacts.workspace import FORMAT
    from pipeline.engine import Engine
    t = synthetic_tensors(ARGS, 0, torch.float16)
    write_workspace(tmp_path / "ws", ARGS, t, None)
    ini = tmp_path / "ws" / WEIGHTS / "config.ini"
    assert read_config(tmp_path / "ws")["format_version"] == FORMAT == 2
    text = ini.read_text()
    ini.write_text(text.replace(f"format_version = {FORMAT}", "format_version = 3"))
    with pytest.raises(ValueError) as e:
        read_config(tmp_path / "ws")
    msg = str(e.value)
    assert "format_version 3" in msg and f"format_version {FORMAT}" in msg and str(tmp_path / "ws") in msg
    assert "python -m pipeline.runner pipeline=serve" in msg and "python -m pipeline.workspace --hf" in msg
    # a workspace from before format versions (no format_version) is version 1: refused by the engine too
    ini.write_text("\n".join(x for x in text.splitlines() if not x.startswith("format_version")) + "\n")
    with pytest.raises(ValueError, match=f"format_version 1, but this code reads format_version {FORMAT}"):
        Engine.from_workspace(tmp_path / "ws", "cpu", {"session_len": 64})


def test_an_artifact_of_another_format_version_is_refused(tmp_path):
    from pipeline.artifacts import kv_qparams, packed_w4, w8a8
    qp = {"layers.0.k.int8.asym.scale": torch.ones(2)}
    kv_qparams.write_kv_qparams(tmp_path, qp)
    assert torch.equal(kv_qparams.read_kv_qparams(tmp_path)["layers.0.k.int8.asym.scale"], torch.ones(2))
    save_file(qp, str(tmp_path / "kv_qparams.safetensors"), metadata={"format_version": "7"})
    with pytest.raises(ValueError, match=r"format_version 7, but this code reads format_version 1: rebuild it with "
                                         r"`python -m pipeline.runner"):
        kv_qparams.read_kv_qparams(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4, "group_size": 64}}))
    save_file({"norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"), metadata={"format_version": "9"})
    for read in (packed_w4.read_dense, w8a8.check):
        with pytest.raises(ValueError, match="format_version 9"):
            read(tmp_path)
    save_file({"norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"))     # written before versions: 1
    assert set(packed_w4.read_dense(tmp_path)) == {"norm.weight"}


# ------------------------------------------------------------------------------------ one load path
def _same(a, b):
    if isinstance(a, torch.Tensor) or a is None:
        return (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    if hasattr(a, "_fields") or hasattr(a, "__dataclass_fields__"):
        fa = a._asdict() if hasattr(a, "_asdict") else vars(a)
        fb = b._asdict() if hasattr(b, "_asdict") else vars(b)
        return type(a) is type(b) and fa.keys() == fb.keys() and all(_same(fa[k], fb[k]) for k in fa)
    return a == b


@pytest.mark.parametrize("kind,tp", [("fp16", 2), ("fp16", 8), ("int4", 2), ("int4", 4), ("int8", 2), ("int8", 8)])
def test_tp1_workspace_is_loaded_as_stored_and_equals_the_joined_shards(tmp_path, kind, tp):
    """ModelRunner over a tp=1 workspace reads the stored kernel-layout tensors (no unpack/repack); over the same
    weights written for tp > 1 (tp=8: KV heads replicated) it joins the ranks' files in the stored layout:
    every tensor the kernels see is identical, and equal to the quantizer's tensors packed for the kernel."""
    from pipeline.artifacts.workspace import Workspace
    from pipeline.engine.model import ModelRunner
    t = synthetic_tensors(ARGS, 0, torch.float16)
    kw = {"fp16": {}, "int4": {"w4": rand_w4(t), "group_size": 64}, "int8": {"w8": rand_w8(t)}}[kind]
    qp = {0: (torch.rand(4), torch.rand(4), torch.rand(4), torch.rand(4))}
    kvq = {i: qp[0] for i in range(ARGS.n_layers)}
    write_workspace(tmp_path / "ws1", ARGS, t, None, tp=1, kv_qparams=kvq, kv_bits=8, **kw)
    write_workspace(tmp_path / "ws2", ARGS, t, None, tp=tp, kv_qparams=kvq, kv_bits=8, **kw)
    dev = torch.device("cpu")
    direct = ModelRunner.from_workspace(Workspace.open(tmp_path / "ws1"), dev, 64)
    merged = ModelRunner.from_workspace(tmp_path / "ws2", dev, 64)
    assert (direct.kv_bits, direct.kv_mode, direct.dtype) == (merged.kv_bits, merged.kv_mode, merged.dtype)
    for a, b in zip(direct.layers, merged.layers):
        for f in ("attn_norm", "ffn_norm", "w_qkv", "b_qkv", "wo", "b_o", "w13", "w2", "kv_static"):
            assert _same(getattr(a, f), getattr(b, f)), (kind, f)
    for f in ("embed", "norm", "lm_head"):
        assert _same(getattr(direct, f), getattr(merged, f)), f
    if kind == "int4":    # what the kernels get is pack_w4 of the quantizer's (q, scales, zeros), rows [q | k | v]
        from pipeline.kernels.w4a16 import pack_w4
        w4 = kw["w4"]
        qkv = [w4[f"layers.1.{n}"] for n in "qkv"]
        ref = pack_w4(torch.cat([x[0] for x in qkv]), torch.cat([x[1] for x in qkv], 1), torch.cat([x[2] for x in qkv], 1), 64)
        assert _same(merged.layers[1].w_qkv, ref) and _same(direct.layers[1].w2, pack_w4(*w4["layers.1.down"], 64))
