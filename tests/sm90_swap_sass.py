"""The W4A16 swap kernel of one config compiled for sm_90 without a GPU, and what its SASS says (Triton 3.6).

    python tests/sm90_swap_sass.py swap_m16_n64_c8_pr 64     # -> {"loop": ..., "pair_lop3": ..., "local": ...}

fp16, split-K, PDL, with the runtime's 16-divisibility of sizes and pointers (what the launcher's JIT specializes on
at the 7B's shapes). `loop`: instructions of the main loop (the backward branch whose body holds the wgmmas);
`pair_lop3`: the PTX's pair unpacks; `local`: spills. tests/test_kernel_w4a16.py runs it with TRITON_INTERPRET=0.
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
from pipeline.kernels.w4a16_configs import CONFIGS  # noqa: E402
from pipeline.kernels.w4a16_swap import _w4a16_swap_kernel as fn  # noqa: E402


def main(name: str, g: int) -> dict:
    _, BM, BN, _, warps, stages, kw, *pairs = CONFIGS[name]
    names = list(fn.arg_names)
    ints = ("M", "N", "K", "stride_xm", "stride_ym", "split_k")
    sig = {n: "i32" if n in ints else "*i32" if n in ("q_ptr", "cnt_ptr") else "*fp32" if n == "ws_ptr"
           else "*fp16" if n.endswith("_ptr") else "constexpr" for n in names}
    cst = dict(GROUP=g, BLOCK_M=BM, BLOCK_N=BN, SPLIT=True, GROUP_M=8, DKIND=1, HAS_BIAS=False, ACT=False, KW=kw,
               PDL=True, PAIRS=bool(pairs and pairs[0]), ASM=True)
    div = [n for n in names if sig[n].startswith("*") or n in ("N", "K", "stride_xm", "stride_ym")]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in cst.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True, check=True,
                              text=True).stdout
    lines = sass.splitlines()
    loop = 0
    for i, line in enumerate(lines):
        m = re.search(r"BRA `?\(\.(L_x_\d+)\)", line)
        head = [j for j, x in enumerate(lines) if m and x.startswith(f".{m.group(1)}:")]
        if head and head[0] < i and any("HGMMA" in x for x in lines[head[0]:i]):
            loop = sum(bool(re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", x)) for x in lines[head[0]:i + 1])
    ptx = k.asm["ptx"]
    return {"loop": loop, "pair_lop3": ptx.count("0x000f000f, 0x64006400"), "local": ".local" in ptx}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
