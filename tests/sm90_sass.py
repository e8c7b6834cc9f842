"""Kernels compiled for sm_90 without a GPU, and what their SASS says (Triton 3.6): the main loop's instructions.

    python tests/sm90_sass.py swap swap_m16_n64_c8_pr 64   # W4A16 swap config at group 64 -> {"loop", "pair_lop3", "local"}
    python tests/sm90_sass.py attn_fma 1                   # the fma decode attention, static int8 KV, ASM on -> {...}

fp16, with the runtime's 16-divisibility of sizes, strides and pointers (what the launchers' JIT specializes on at the
7B's shapes). `loop`: instructions of the main loop (the backward branch with the most instructions in its body);
`local`: spills. tests/test_kernel_w4a16.py and tests/test_kernel_attention.py run it with TRITON_INTERPRET=0.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def compile_sm90(fn, sig: dict, cst: dict, warps: int, stages: int):
    names = list(fn.arg_names)
    sig = {n: sig.get(n, "constexpr" if n in cst else "i32") for n in names}
    div = [n for n in names if sig[n].startswith("*") or n in ("N", "K") or n.startswith("stride") or n.startswith("s_")]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in cst.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _tool(name: str, *args: str, file: tuple[str, bytes | str]) -> subprocess.CompletedProcess:
    """Run Triton's own copy of an NVIDIA tool on one file (name, contents) in a temporary folder."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    fname, data = file
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, fname), "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        return subprocess.run([os.path.join(tools, name), *args, fname], cwd=d, capture_output=True, check=True,
                              text=True)


def sass_text(cubin: bytes) -> str:
    """The cubin's SASS (nvdisasm)."""
    return _tool("nvdisasm", "-c", file=("k.cubin", cubin)).stdout


def ptxas_info(ptx: str) -> str:
    """ptxas's -v messages for this PTX (sm_90a), e.g. C7515 when it serializes wgmmas."""
    return _tool("ptxas", "-arch=sm_90a", "-v", "-o", os.devnull, file=("k.ptx", ptx)).stderr


def loop_bodies(cubin: bytes) -> list[list[str]]:
    """The instructions of every loop body (a backward branch to a label before it)."""
    lines, out = sass_text(cubin).splitlines(), []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `?\(\.(L_x_\d+)\)", line)
        head = [j for j, x in enumerate(lines) if m and x.startswith(f".{m.group(1)}:")]
        if head and head[0] < i:
            out.append([x for x in lines[head[0]:i + 1] if re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", x)])
    return out


def loop_body(cubin: bytes) -> list[str]:
    """The instructions of the largest loop body."""
    return max(loop_bodies(cubin), key=len, default=[])


def mma_loop_body(cubin: bytes) -> list[str]:
    """The instructions of the smallest loop body that holds an HGMMA (the pipelined loop, also when a loop over
    tiles holds it)."""
    return min((b for b in loop_bodies(cubin) if any("HGMMA" in x for x in b)), key=len, default=[])


def loop_instructions(cubin: bytes) -> int:
    return len(loop_body(cubin))


def swap(name: str, g: int) -> dict:
    from pipeline.kernels.w4a16_configs import CONFIGS, swap_fields
    from pipeline.kernels.w4a16_swap import _w4a16_swap_kernel as fn
    BM, BN, _, warps, stages, kw, pairs, unroll = swap_fields(CONFIGS[name])
    sig = {n: "*i32" if n in ("q_ptr", "cnt_ptr") else "*fp32" if n == "ws_ptr" else "*fp16"
           for n in fn.arg_names if n.endswith("_ptr")}
    cst = dict(GROUP=g, BLOCK_M=BM, BLOCK_N=BN, SPLIT=True, GROUP_M=8, DKIND=1, HAS_BIAS=False, ACT=False, KW=kw,
               PDL=True, PAIRS=pairs, ASM=True, UNROLL=unroll)
    k = compile_sm90(fn, sig, cst, warps, stages)
    ptx = k.asm["ptx"]
    body = "\n".join(loop_body(k.asm["cubin"]))   # in the main loop: a fence, a shared store, a wait for every wgmma
    return {"loop": loop_instructions(k.asm["cubin"]), "pair_lop3": ptx.count("0x000f000f, 0x64006400"),
            "local": ".local" in ptx, "membar": "MEMBAR" in body, "sts": bool(re.search(r"\bSTS\b", body)),
            "wait_all_wgmma": "DEPBAR.LE gsb0, 0x0" in body}


def swapk(name: str, g: int) -> dict:
    """A stream-K swap config (`w4a16_streamk`): the same measures, and whether the main loop streams by cp.async
    (LDGSTS) with loads left in flight across iterations (a DEPBAR that does not wait for all of them)."""
    from pipeline.kernels.w4a16_configs import CONFIGS
    from pipeline.kernels.w4a16_streamk import _w4a16_swapk_kernel as fn
    _, BM, BN, _, warps, stages, kw, pairs, *nested = CONFIGS[name]
    sig = {n: "*i32" if n in ("q_ptr", "cnt_ptr") else "*fp32" if n == "ws_ptr" else "*fp16"
           for n in fn.arg_names if n.endswith("_ptr")}
    cst = dict(MAX_PARTS=3, GROUP=g, BLOCK_M=BM, BLOCK_N=BN, DKIND=1, HAS_BIAS=False, ACT=False, KW=kw, PDL=True,
               PAIRS=pairs, ASM=True, NESTED=bool(nested and nested[0]))
    from pipeline.kernels.w4a16 import _swap_stages
    k = compile_sm90(fn, sig, cst, warps, _swap_stages(BM, BN, g, stages, False, 2))
    ptx = k.asm["ptx"]
    body = "\n".join(mma_loop_body(k.asm["cubin"]))
    regs = int(re.findall(r"Used (\d+) registers", ptxas_info(ptx))[0])
    return {"loop": len(body.splitlines()), "pair_lop3": ptx.count("0x000f000f, 0x64006400"),
            "regs": regs, "smem": k.metadata.shared, "warps": warps,
            "local": ".local" in ptx, "ldgsts": len(re.findall(r"\bLDGSTS", body)),
            "depbar": re.findall(r"DEPBAR\.LE SB0, 0x[0-9a-f]+", body), "wgmma": len(re.findall(r"HGMMA", body)),
            "wait_all_wgmma": "DEPBAR.LE gsb0, 0x0" in body}


def attn_fma(asm: int) -> dict:
    from pipeline.kernels.attention import _attn_decode_g1_kernel as fn
    sig = {"Q": "*fp16", "K": "*i8", "V": "*i8", "BT": "*i32", "CL": "*i32", "KS": "*fp32", "KZ": "*fp32",
           "VS": "*fp32", "VZ": "*fp32", "O": "*fp16", "OP": "*fp32", "LSE": "*fp32", "CNT": "*i32", "sm_scale": "fp32"}
    cst = dict(BLOCK_SIZE=64, HEAD_DIM=128, BLOCK_N=32, MODE=1, BITS=8, SPLIT=False, BLOCK_S=4, PDL=True,
               ASM=bool(asm))
    k = compile_sm90(fn, sig, cst, 4, 2)
    ptx = k.asm["ptx"]
    return {"loop": loop_instructions(k.asm["cubin"]), "byte_prmt": ptx.count("0x64646464, 0x4140"),
            "local": ".local" in ptx}


def measure(*args: str) -> dict:
    """This script's answer for args, from a subprocess with the compiler (a test process may be interpreting)."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=300)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.splitlines()[-1])


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    print(json.dumps({"swap": lambda n, g: swap(n, int(g)), "swapk": lambda n, g: swapk(n, int(g)),
                      "attn_fma": lambda a: attn_fma(int(a))}[kind](*args)))
