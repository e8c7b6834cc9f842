"""pipeline/kernels/launch.py: when a launch goes through Triton's JIT and when straight to the compiled kernel.

No GPU here, so the JIT function is a stand-in with Triton's shape (device_caches ending in a binder that returns
(bound args, specialisation, options); `fn[grid](...)` compiles and returns a kernel that launches as
`kernel[grid3](*bound args)`). The real kernels through this path are checked on the GPU (`pytest -m gpu`).
"""
import pytest
import torch

from pipeline.kernels import launch


class Compiled:
    def __init__(self, log, spec, fail=False):
        self.log, self.spec, self.fail = log, spec, fail

    def __getitem__(self, grid):
        def run(*args):
            if self.fail:
                raise TypeError("function takes exactly 5 arguments (3 given)")
            self.log.append(("direct", self.spec, grid, args))
        return run


class FakeJit:
    """Specialises `n` like Triton does an int (equal to 1 or not); options are the non-signature keywords."""

    def __init__(self, fail_direct=False):
        self.device_caches, self.log, self.kernels, self.fail_direct = {}, [], {}, fail_direct

    def _bind(self, x, n, BLOCK=64, **options):
        return {"x": x, "n": n, "BLOCK": BLOCK}, [("*fp32", "D"), ("i32", "1" if n == 1 else ""), BLOCK], options

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.device_caches.setdefault(0, ({}, {}, "target", "backend", self._bind))
            _, spec, opts = self._bind(*args, **kwargs)
            self.log.append(("jit", tuple(spec), grid, args))
            key = (tuple(spec), tuple(opts.items()))
            return self.kernels.setdefault(key, Compiled(self.log, tuple(spec), self.fail_direct))
        return run


@pytest.fixture
def on_gpu(monkeypatch):
    """As on a GPU: no interpreter, device 0, the direct path on and never broken."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(launch._state, "on", True)
    monkeypatch.setitem(launch._state, "broken", None)


def test_repeat_launches_skip_the_jit_and_pass_every_argument(on_gpu):
    fn = FakeJit()
    k = launch.FastKernel(fn)
    x = object()
    k[(4,)](x, 7, BLOCK=128, num_warps=4)
    k[(4, 2)](x, 9, BLOCK=128, num_warps=4)        # same specialisation (n != 1): the remembered kernel
    assert [e[0] for e in fn.log] == ["jit", "direct"]
    assert fn.log[1][2:] == ((4, 2, 1), (x, 9, 128))  # grid padded to 3-D, constexprs in signature order
    k[(4,)](x, 1, BLOCK=128, num_warps=4)          # n == 1 is another specialisation: through Triton again
    k[(4,)](x, 1, BLOCK=128, num_warps=4)
    k[(4,)](x, 1, BLOCK=128, num_warps=8)          # another launch option: through Triton again
    k[(4,)](x, 1, BLOCK=64, num_warps=8)           # another constexpr value: through Triton again
    assert [e[0] for e in fn.log] == ["jit", "direct", "jit", "direct", "jit", "jit"]
    assert fn.log[3][1] == (("*fp32", "D"), ("i32", "1"), 128)


def test_interpreter_callable_grids_and_switch_off_use_the_jit(on_gpu, monkeypatch):
    fn = FakeJit()
    k = launch.FastKernel(fn)
    for _ in range(2):
        k[lambda meta: (4,)](None, 3)
    launch.set_enabled(False)
    for _ in range(2):
        k[(4,)](None, 3)
    launch.set_enabled(True)
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    for _ in range(2):
        k[(4,)](None, 5)
    assert [e[0] for e in fn.log] == ["jit"] * 6
    assert launch.fast_launch(fn) is fn   # decorating under the interpreter leaves the function as it is


def test_a_failing_direct_launch_falls_back_for_good(on_gpu, caplog):
    fn = FakeJit(fail_direct=True)
    k = launch.FastKernel(fn)
    for _ in range(3):
        k[(2,)](None, 3)
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit"]   # the failed direct call was redone through Triton
    assert "exactly 5 arguments" in launch.disabled_reason()
    assert "direct Triton launches disabled" in caplog.text
    other = FakeJit()
    for _ in range(2):
        launch.FastKernel(other)[(2,)](None, 3)
    assert [e[0] for e in other.log] == ["jit", "jit"]       # and for every kernel after that


def test_attributes_are_the_jit_functions():
    fn = FakeJit()
    assert launch.FastKernel(fn).device_caches is fn.device_caches


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_kernels_direct_launches_match_the_reference():
    """Each call twice (the second through the direct path) on inputs whose specialisation differs: M = 1 and
    M > 1, 16-byte aligned and misaligned activations (a view one element in); every output checked."""
    from pipeline.kernels import norm
    from pipeline.kernels import w4a16 as w4
    dev, K, N, g = torch.device("cuda"), 512, 384, 128
    w = w4.pack_w4(torch.randint(0, 16, (N, K), dtype=torch.uint8), (torch.rand(K // g, N) * 0.02 + 1e-3).half(),
                   torch.randint(0, 16, (K // g, N)).half(), g).to(dev)
    nw = torch.rand(K, device=dev, dtype=torch.float16)
    for M in (1, 3, 16, 40):
        for offset in (0, 1):
            base = torch.randn(M, K + offset, device=dev, dtype=torch.float16)
            x = base[:, offset:]
            assert (x.data_ptr() % 16 == 0) == (offset == 0)
            ref = w4.w4a16_linear_ref(x.float(), w).half()
            nref = norm.rms_norm_ref(x, nw, 1e-5)
            for _ in range(2):
                y = w4.w4a16_linear(x, w)
                assert (y.float() - ref.float()).abs().max() <= 2e-3 * ref.float().abs().max() + 1e-3, (M, offset)
                assert torch.allclose(norm.rms_norm(x, nw, 1e-5), nref, atol=2e-3, rtol=2e-3), (M, offset)
    assert launch.disabled_reason() is None
    assert sum(len(k._compiled) for k in (w4._dequant_kernel, norm._rmsnorm_kernel)) >= 1
