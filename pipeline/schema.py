"""Dataclass schemas behind the YAML in conf/ (registered in Hydra's ConfigStore).

A mistyped key or a wrong type fails when Hydra composes the config, naming the key, e.g.
    Key 'grup_size' not in 'QuantConfig'  full_key: quant.grup_size
Mode fields are enums: a wrong value fails at start, before any stage runs, naming the allowed values, e.g.
    Invalid value 'apii', expected one of [generate, chat, api]  full_key: serve.mode
They are StrEnums, so code compares them with plain strings (`cfg.serve.mode == "api"`) and they hash into
stage keys (pipeline/cache.py) as those strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from .models.llama import ModelArgs


class ServeMode(StrEnum):
    generate = "generate"             # answer serve.prompts and exit
    chat = "chat"                     # terminal chat
    api = "api"                       # OpenAI-compatible HTTP server


class KvMode(StrEnum):
    static = "static"                 # calibrated zp/scale per layer and KV head (kv_qparams)
    dynamic = "dynamic"               # per token, computed at run time


class EvalDtype(StrEnum):
    auto = "auto"                     # fp16 on GPU, fp32 on CPU
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class CalibDataset(StrEnum):          # pipeline/quant/calib_data.py (SOURCES)
    embedded = "embedded"
    file = "file"
    c4 = "c4"
    wikitext2 = "wikitext2"
    ptb = "ptb"
    pileval = "pileval"


class Verify(StrEnum):
    full = "full"                     # sizes and sha256 of every cached file
    size = "size"                     # sizes only (faster warm runs on 7B artifacts)


@dataclass
class PipelineConfig:
    name: str = "deploy"
    targets: List[str] = field(default_factory=lambda: ["evaluate"])  # stages to reach; upstream ones follow
    dry_run: bool = False             # print the plan (each stage, its key, cached or why not); run nothing


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    source: str = "embedded"          # hf | gguf | embedded | synthetic
    path: Optional[str] = None        # folder (hf) or file (gguf), or a Hub id org/name (hf; pipeline/models/hub.py)
    revision: Optional[str] = None    # Hub id only: branch, tag or commit (None: main)
    dtype: str = "float32"            # dtype of the loaded weights: float32 | float16 | bfloat16
    seed: int = 0                     # synthetic weights
    shape: ModelArgs = field(default_factory=ModelArgs)  # synthetic shapes; ignored by real checkpoints


@dataclass
class CalibConfig:
    dataset: CalibDataset = CalibDataset.embedded
    path: Optional[str] = None        # local .txt / .jsonl / .parquet (dataset=file)
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass
class QuantConfig:
    name: str = "fp16"
    w_bits: Optional[int] = None      # None: 16-bit weights; 4 (3, 8 accepted): weight-only quantization
    group_size: int = 128
    zero_point: bool = True           # asymmetric weights
    search: bool = True               # AWQ scale search; False: round-to-nearest (RTN)
    n_grid: int = 20
    clip: bool = True                 # AWQ clip search
    search_samples: int = 8           # calibration sequences (a seeded subset) the AWQ search losses run on
    gptq: bool = False                # GPTQ error feedback on every calibration window (after AWQ if search/clip)
    gptq_damp: float = 0.01           # dampening: this fraction of H's mean diagonal added to the diagonal
    gptq_block: int = 128             # columns per lazy update block (a multiple of group_size)
    gptq_desc_act: bool = False       # act order: columns by descending H diagonal (groups stay static)
    gptq_mse: bool = False            # shrink each group's range by an MSE grid search (else min/max)
    gptq_feedback: float = 1.0        # fraction of each column's error fed forward (1: GPTQ, 0: round to nearest)
    kv_bits: Optional[int] = None     # None: 16-bit KV; 8 or 4
    kv_sym: bool = False
    kv_mode: KvMode = KvMode.static
    a_bits: Optional[int] = None      # None: 16-bit activations; 8: W8A8 (SmoothQuant, int8 per-token dynamic)
    smooth_alpha: float = 0.5         # SmoothQuant migration strength; 0 = no smoothing (s = 1)
    smooth_search: bool = False       # search alpha per layer and group on the W8A8 block output error
    smooth_grid: List[float] = field(default_factory=lambda: [i / 10 for i in range(11)])  # alphas tried
    calib: CalibConfig = field(default_factory=CalibConfig)


@dataclass
class EvalConfig:
    path: Optional[str] = None        # text file; None: the embedded corpus (Python's own docs)
    windows: int = 40                 # non-overlapping windows
    seqlen: int = 512
    batch_size: int = 4
    dtype: EvalDtype = EvalDtype.auto  # compute dtype


@dataclass
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 23333
    keys: List[str] = field(default_factory=list)
    served_model_name: List[str] = field(default_factory=list)   # names requests may use; [] = config.ini's
    allowed_origins: List[str] = field(default_factory=list)     # CORS origins ("*": any); [] = same-origin only
    log_stats_interval: float = 10.0  # s between the log's throughput / queue / KV usage lines while busy (0: none)
    ssl_keyfile: Optional[str] = None   # HTTPS: private key and certificate (both or neither)
    ssl_certfile: Optional[str] = None


@dataclass
class ServeConfig:
    mode: ServeMode = ServeMode.generate
    tp: int = 1                       # tensor-parallel ranks (one process per device; pipeline/engine/tp.py)
    tp_timeout: float = 120.0         # seconds: bound on every collective and on the ranks' start-up
    max_batch_size: int = 32
    session_len: int = 4096
    cache_max_entry_count: float = 0.8
    cache_block_size: int = 64
    max_prefill_tokens: int = 2048
    cuda_graphs: bool = True
    prefix_caching: bool = True       # reuse the KV blocks of shared prompt prefixes
    mixed_steps: bool = True          # decoders advance in the same forward as new prompts' prefill chunks
    schedule: str = "shortest_first"  # prefill order of prompts admitted together: shortest_first | fcfs
    engine_process: bool = True       # the engine steps in a process of its own (False: a thread of the server's)
    speculative_tokens: int = 0       # prompt-lookup speculative decoding: drafts a step checks per greedy request
    speculative_ngram: int = 3        # the longest n-gram it matches
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    prompts: List[str] = field(default_factory=list)
    system_prompt: Optional[str] = None  # chat mode: a system prompt ahead of the conversation
    workspace: Optional[str] = None   # serve this workspace folder instead of building one (turbomind stage)
    num_blocks: int = 0               # KV cache blocks; 0: sized from cache_max_entry_count
    api: ApiConfig = field(default_factory=ApiConfig)


@dataclass
class LaunchConfig:
    """Read by the launcher presets in conf/hydra/launcher/ (hydra/launcher=local|submitit|slurm|ray_jobs)."""
    jobs: int = 2                     # jobs at once on one machine (joblib workers, Ray local CPUs)
    partition: Optional[str] = None   # SLURM partition
    gpus_per_job: int = 1             # SLURM / Ray GPUs per job
    cpus_per_job: int = 8             # SLURM cpus per task
    mem_gb: Optional[int] = None      # SLURM memory per job
    time_min: int = 60                # SLURM time limit per job, minutes
    spread_gpus: bool = True          # one visible GPU per job when a job sees several (pipeline/gpus.py)


@dataclass
class Config:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    cache_dir: str = "outputs/cache"
    download_dir: str = "outputs/downloads"
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    verify: Verify = Verify.full      # cache verification
    lock_stale_after: float = 120.0   # seconds without a heartbeat before a lock is taken over


def register() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
