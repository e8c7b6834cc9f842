"""Logprobs inside the engine (CPU, a tiny random llama): the chosen tokens' logprobs and the top-k equal PyTorch's
log_softmax of the reference model's logits, for generated tokens (greedy and sampled, with and without the
look-ahead decode path, in a batch with requests that ask for nothing) and for prompt tokens (echo, chunked
prefill, max_new_tokens=0); identical prompts submitted together compute their shared KV blocks once (n > 1)."""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine, SamplingParams
from pipeline.models.llama import ModelArgs, build_model
from pipeline.models.sources import save_byte_tokenizer, synthetic_tensors
from pipeline.workspace import write_workspace

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=320,
                 max_seq_len=512)
PROMPT = list(range(10, 47))          # 37 tokens: 2 full blocks of 16 and a partial one
OTHER = [5, 6, 7]
TOL = 1e-4                            # fp32 on both sides: only summation order differs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    t = synthetic_tensors(ARGS, 0, torch.float32)
    save_byte_tokenizer(root / "tok", ARGS.vocab_size)
    write_workspace(root / "fp16", ARGS, t, root / "tok", kv_bits=None)
    return {"ws": root / "fp16", "ref": build_model(ARGS, {k: v.half().float() for k, v in t.items()})}


def engine(tiny, **overrides):
    return Engine.from_workspace(tiny["ws"], "cpu", {"session_len": 256, "cache_block_seq_len": 16, **overrides})


@torch.no_grad()
def ref_logprobs(tiny, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): row p = log_softmax of the reference model's logits after ids[:p + 1]."""
    return torch.log_softmax(tiny["ref"](torch.tensor([ids]))[0].float(), -1)


def collect(h):
    outs = list(h)
    ids = [t for o in outs for t in o.token_ids]
    lps = [e for o in outs if o.logprobs is not None for e in o.logprobs]
    prompt = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    return ids, lps, prompt, outs[-1]


def check_entries(entries, ids, lr, k):
    """entries[i] = [logprob of ids[i], top ids, top logprobs] against reference rows lr[i]."""
    assert len(entries) == len(ids)
    for e, t, row in zip(entries, ids, lr):
        lp, top_ids, top_lps = e
        assert abs(lp - row[t].item()) < TOL
        want = row.topk(k)
        assert top_ids == want.indices.tolist() and len(top_lps) == k
        assert torch.allclose(torch.tensor(top_lps), want.values, atol=TOL)


@pytest.mark.parametrize("lookahead", [True, False], ids=["lookahead", "step-by-step"])
def test_generated_logprobs_equal_reference_log_softmax(tiny, lookahead):
    eng = engine(tiny, lookahead=lookahead)
    alone = eng.generate([OTHER], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    greedy = eng.submit(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=3))
    sampled = eng.submit(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=0, temperature=0.9,
                                                seed=5))
    plain = eng.submit(OTHER, SamplingParams(max_new_tokens=8, ignore_eos=True))
    ids, lps, prompt, last = collect(greedy)
    assert prompt == [] and last.finish_reason == "length"
    lr = ref_logprobs(tiny, PROMPT + ids)[len(PROMPT) - 1:-1]
    assert ids == lr.argmax(-1).tolist()
    check_entries(lps, ids, lr, 3)
    s_ids, s_lps, _, _ = collect(sampled)        # the model's own distribution, before temperature
    s_lr = ref_logprobs(tiny, PROMPT + s_ids)[len(PROMPT) - 1:-1]
    check_entries(s_lps, s_ids, s_lr, 0)
    p_ids, p_lps, _, last = collect(plain)       # a batch mate that asks for nothing: no logprobs, same tokens
    assert p_ids == alone and p_lps == [] and last.logprobs is None
    assert eng.stats()["free_blocks"] == eng.stats()["total_blocks"]


def test_prompt_logprobs_score_the_prompt_over_chunks(tiny):
    eng = engine(tiny, max_prefill_tokens=16)    # 37 prompt tokens in 3 chunks
    eng.generate([PROMPT], SamplingParams(max_new_tokens=2, ignore_eos=True))   # its blocks now cached
    before = eng.stats()
    ids, lps, prompt, last = collect(eng.submit(PROMPT, SamplingParams(max_new_tokens=0, prompt_logprobs=2)))
    assert ids == [] and lps == [] and last.finish_reason == "length" and last.num_generated_tokens == 0
    assert len(prompt) == 1 and prompt[0][0] is None and len(prompt[0]) == len(PROMPT)
    lr = ref_logprobs(tiny, PROMPT)
    check_entries(prompt[0][1:], PROMPT[1:], lr[:-1], 2)
    after = eng.stats()                          # every row computed: no cached prefix used or counted
    assert after["steps"]["prefill_tokens"] - before["steps"]["prefill_tokens"] == len(PROMPT)
    assert after["prefix_cache"]["queries"] == before["prefix_cache"]["queries"]
    # echo with generation: the prompt's entries, then each new token's (the engine's first sample row included)
    ids, lps, prompt, _ = collect(eng.submit(PROMPT, SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=1,
                                                                    prompt_logprobs=1)))
    lr = ref_logprobs(tiny, PROMPT + ids)
    check_entries(prompt[0][1:], PROMPT[1:], lr[:len(PROMPT) - 1], 1)
    check_entries(lps, ids, lr[len(PROMPT) - 1:-1], 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.submit(PROMPT, SamplingParams(max_new_tokens=0))       # 0 new tokens only when scoring the prompt


def test_identical_prompts_submitted_together_share_their_blocks(tiny):
    """n samples of one prompt (what the server submits for n > 1): the first computes the full prompt blocks, the
    others wait for them and reuse them (2 blocks of 16 each), prefilling only the rest."""
    eng = engine(tiny)
    hs = [eng.submit(PROMPT, SamplingParams(max_new_tokens=6, ignore_eos=True)) for _ in range(3)]
    outs = [collect(h)[0] for h in hs]
    assert outs[0] == outs[1] == outs[2]
    st = eng.stats()
    assert st["prefix_cache"]["hits"] == 2 * 32 and st["prefix_cache"]["queries"] == 3 * len(PROMPT)
    assert st["steps"]["prefill_tokens"] == len(PROMPT) + 2 * (len(PROMPT) - 32)
    assert st["free_blocks"] == st["total_blocks"]
    off = engine(tiny, prefix_caching=False)     # without prefix caching nobody waits: same tokens
    assert [collect(h)[0] for h in [off.submit(PROMPT, SamplingParams(max_new_tokens=6, ignore_eos=True))
                                    for _ in range(3)]] == outs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_logprobs_beside_the_graph_fast_path(tiny):
    """On a GPU (fp16 compute, decode and prefill CUDA graphs, look-ahead): a request with logprobs and one scoring
    its prompt share steps with a plain greedy request, which keeps its tokens; the logprobs match the reference
    within fp16 rounding."""
    eng = Engine.from_workspace(tiny["ws"], "cuda", {"session_len": 256, "cache_block_seq_len": 16,
                                                     "max_batch_size": 4, "max_prefill_tokens": 64})
    alone = eng.generate([OTHER], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    plain = eng.submit(OTHER, SamplingParams(max_new_tokens=20, ignore_eos=True))
    asks = eng.submit(PROMPT, SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=2))
    scores = eng.submit(PROMPT, SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    assert collect(plain)[0] == alone
    ids, lps, _, _ = collect(asks)
    lr = ref_logprobs(tiny, PROMPT + ids)
    for t, (lp, top_ids, _), row in zip(ids, lps, lr[len(PROMPT) - 1:-1]):
        assert abs(lp - row[t].item()) < 0.05 and top_ids[0] == t      # greedy: the chosen token is the top one
    prompt = collect(scores)[2][0]
    assert max(abs(e[0] - lr[i, t].item()) for i, (e, t) in enumerate(zip(prompt[1:], PROMPT[1:]))) < 0.05
