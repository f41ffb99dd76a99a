"""Typed configuration: dataclasses with defaults, loaded from YAML plus `--set section.key=value`.

Every field is checked on load: unknown keys, wrong types and impossible combinations raise
`ConfigError` naming the field, the bad value and what is allowed, before any work is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pangu.config.optim import OptimConfig, read_optim
from pangu.schema import ConfigError, apply_override, from_dict, parse_bytes
from pangu.schema import require as _require

PADDED_VOCAB_MULTIPLE = 128
# A trained tokenizer holds SentencePiece's 3 ids, PanGu's 7 special pieces and 256 byte pieces,
# and needs room for some merges.
MIN_TRAINED_VOCAB_SIZE = 300

# Checks that belong to packages above this one (an optimizer's needs across sections, such as
# sgd_si's scale-invariant model): they register themselves here on import, as the optimizers'
# options do (register_options), so that config imports none of them and load_config still runs
# every check before any work. pangu/__init__.py imports them.
_CHECKS: list[Callable[[Config], None]] = []


def register_check(check: Callable[[Config], None]) -> None:
    _CHECKS.append(check)


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 4  # counts the query layer: num_layers - 1 ordinary blocks, then the query layer
    hidden_size: int = 128
    num_heads: int = 4
    ffn_hidden_size: int = 0  # 0 means 4 * hidden_size
    vocab_size: int = 40000  # the tokenizer's size; the embedding is padded to a multiple of 128
    seq_length: int = 1024
    activation: Literal["fast_gelu", "gelu"] = "fast_gelu"
    final_layernorm: Literal["before", "after"] = "before"  # relative to the query layer
    dropout: float = 0.1  # embedding, attention probabilities, attention output and FFN output
    attention_dropout: float = -1.0  # < 0 means: same as dropout
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    scale_invariant: bool = False  # the SIBERT-style trunk for optim.name = sgd_si (see pangu_alpha.py)

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def attention_dropout_rate(self) -> float:
        return self.dropout if self.attention_dropout < 0 else self.attention_dropout

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // PADDED_VOCAB_MULTIPLE) * PADDED_VOCAB_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _require(
            self.num_layers >= 2,
            "model.num_layers",
            self.num_layers,
            ">= 2 (it counts the query layer, so 2 means one block plus the query layer)",
        )
        for name in ("hidden_size", "num_heads", "vocab_size", "seq_length"):
            _require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), ">= 1")
        _require(
            self.ffn_hidden_size >= 0, "model.ffn_hidden_size", self.ffn_hidden_size, ">= 0 (0 means 4 * hidden_size)"
        )
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            self.hidden_size,
            f"a multiple of model.num_heads ({self.num_heads})",
        )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a rate in [0, 1)")
        _require(
            self.attention_dropout < 1.0,
            "model.attention_dropout",
            self.attention_dropout,
            "a rate in [0, 1), or < 0 to use model.dropout",
        )
        _require(self.layernorm_eps > 0, "model.layernorm_eps", self.layernorm_eps, "> 0")
        _require(self.init_std > 0, "model.init_std", self.init_std, "> 0")
        if self.scale_invariant:
            _require(
                self.final_layernorm == "after",
                "model.final_layernorm",
                self.final_layernorm,
                "'after' with model.scale_invariant (the non-affine LayerNorm sits before the head)",
            )


@dataclass
class SourceConfig:
    kind: Literal["builtin", "json", "jsonl", "parquet", "text"] = "builtin"
    path: str = ""  # a file, directory or glob for the local kinds; unused by "builtin"
    text_field: str = "text"
    weight: float = 1.0  # blending weight: the share of training tokens drawn from this source


@dataclass
class TokenizerConfig:
    # "pangu": the released PanGu-alpha SentencePiece model at `path`;
    # "train": train a new SentencePiece model on the cleaned corpus during `pangu prepare`.
    kind: Literal["pangu", "train"] = "pangu"
    path: str = ""  # kind "pangu": empty means the released model shipped with pangu (pangu/assets)
    algorithm: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 40000  # for kind "train"
    train_sentences: int = 200000  # how many cleaned documents the trainer samples (the same ones
    # for any number of processes: those with the smallest hash of their text)
    num_threads: int = 16  # SentencePiece trainer threads: its result depends on this number, so it
    # is fixed here rather than following data.num_proc


@dataclass
class CleaningConfig:
    min_length: int = 10  # characters
    min_chinese_ratio: float = 0.3
    to_simplified: bool = False
    deduplicate: bool = True
    # a longer document (UTF-8 bytes) is cut into documents of at most this size at line or
    # sentence ends, which bounds memory; a JSON record over 16 times this size is skipped unread
    max_document_size: str = "1MB"


@dataclass
class NearDedupConfig:
    """Near-duplicate removal (MinHash LSH over character n-grams): a document is removed when, in
    any band, its MinHash values equal those of an earlier document. Two documents whose n-gram
    sets have Jaccard similarity s share a band with probability 1 - (1 - s^rows)^bands: with the
    defaults (as datatrove's) about 0.5 at s = 0.72 and above 0.99 at s = 0.85."""

    enabled: bool = False
    ngram: int = 5  # characters per shingle (whitespace removed, lowercased)
    bands: int = 14
    rows: int = 8  # MinHash values per band; bands x rows hash functions in all


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    prepared_dir: str = "data_cache/default"
    # worker processes per rank of `pangu prepare`; 0: every core of the node, shared by its ranks
    num_proc: int = 0
    # the unit of work: input files are cut into pieces of about this many bytes (at line starts;
    # parquet: row groups; a compressed file is one piece). Pieces are what a resumed prepare keeps
    piece_size: str = "64MB"
    # consecutive pieces of a source, about this many input bytes, make one shard file per split
    shard_size: str = "4GB"
    # where pieces are kept until the preparation is published ("": .<name>.work beside
    # prepared_dir); with several nodes it must be a directory every node sees
    work_dir: str = ""
    # how long a rank of a multi-process prepare waits for the others (tokenizer training, slow ranks)
    timeout_minutes: float = 1440.0
    valid_fraction: float = 0.01  # of documents, chosen by a hash of the text: deterministic
    eod_reset: bool = False  # restart positions and block attention after each separator
    seed: int = 1234

    def validate(self) -> None:
        _require(len(self.sources) >= 1, "data.sources", self.sources, "at least one source")
        for i, source in enumerate(self.sources):
            _require(source.weight > 0, f"data.sources[{i}].weight", source.weight, "> 0")
            if source.kind != "builtin":
                _require(
                    bool(source.path),
                    f"data.sources[{i}].path",
                    source.path,
                    f"a file, directory or glob (required for kind {source.kind!r})",
                )
        _require(self.num_proc >= 0, "data.num_proc", self.num_proc, ">= 0 (0: every core of the node)")
        for name, value in (
            ("piece_size", self.piece_size),
            ("shard_size", self.shard_size),
            ("cleaning.max_document_size", self.cleaning.max_document_size),
        ):
            try:
                size = parse_bytes(value)
            except ConfigError:
                size = -1
            _require(size >= 1 << 10, f"data.{name}", value, "a size of at least 1KiB, e.g. 64MB or 4GB")
        _require(self.timeout_minutes > 0, "data.timeout_minutes", self.timeout_minutes, "> 0")
        near = self.near_dedup
        _require(near.ngram >= 1, "data.near_dedup.ngram", near.ngram, ">= 1")
        _require(near.bands >= 1, "data.near_dedup.bands", near.bands, ">= 1")
        _require(near.rows >= 1, "data.near_dedup.rows", near.rows, ">= 1")
        _require(self.tokenizer.num_threads >= 1, "data.tokenizer.num_threads", self.tokenizer.num_threads, ">= 1")
        _require(self.seed >= 0, "data.seed", self.seed, ">= 0")
        _require(self.cleaning.min_length >= 0, "data.cleaning.min_length", self.cleaning.min_length, ">= 0")
        _require(
            self.tokenizer.train_sentences >= 1,
            "data.tokenizer.train_sentences",
            self.tokenizer.train_sentences,
            ">= 1",
        )
        _require(0.0 < self.valid_fraction < 0.5, "data.valid_fraction", self.valid_fraction, "a fraction in (0, 0.5)")
        _require(
            0.0 <= self.cleaning.min_chinese_ratio <= 1.0,
            "data.cleaning.min_chinese_ratio",
            self.cleaning.min_chinese_ratio,
            "a fraction in [0, 1]",
        )
        if self.tokenizer.kind == "train":
            _require(
                self.tokenizer.vocab_size >= MIN_TRAINED_VOCAB_SIZE,
                "data.tokenizer.vocab_size",
                self.tokenizer.vocab_size,
                f">= {MIN_TRAINED_VOCAB_SIZE} (room for PanGu's special and byte pieces)",
            )


@dataclass
class ParallelConfig:
    # which engine runs the network (pangu/parallel/engine.py): torch's pipelining schedules,
    # DTensor TP (and sequence parallelism) and FSDP2, or DeepSpeed's pipeline engine (1F1B) with
    # ZeRO-1 and megatron-core's TP layers (docs/architecture.md: how they compare)
    engine: Literal["torch", "deepspeed"] = "torch"
    tp: int = 1  # tensor (op-level) parallel size
    pp: int = 1  # pipeline ranks; dp = world_size / (tp * pp)
    # the pipeline schedule (torch engine; deepspeed runs 1f1b): 1f1b, interleaved 1F1B, interleaved
    # zero bubble (zero_bubble) or the V-shaped zero bubble (zbv, two stages per rank)
    schedule: Literal["1f1b", "interleaved_1f1b", "zero_bubble", "zbv"] = "1f1b"
    virtual_stages: int = 1  # pipeline stages per rank (interleaved schedules: >= 2; zbv: 2)
    # LayerNorm, dropout and the residual stream split over the sequence across the tp group
    # (torch engine): activation memory / tp between the tensor-parallel regions
    sequence_parallel: bool = False
    recompute: Literal["none", "full", "selective"] = "none"
    partition: Literal["parameters", "uniform"] = "parameters"  # how layers are split across stages
    # every process group's collective timeout: long enough for the slowest collective a run
    # waits in (a checkpoint save, a validation pass)
    timeout_minutes: float = 30.0

    def validate(self) -> None:
        _require(self.tp >= 1, "parallel.tp", self.tp, ">= 1")
        _require(self.pp >= 1, "parallel.pp", self.pp, ">= 1")
        stages = {"1f1b": "1", "zbv": "2"}.get(self.schedule, ">= 2")  # stages per rank each schedule runs
        _require(
            str(self.virtual_stages) == stages or (stages == ">= 2" and self.virtual_stages >= 2),
            "parallel.virtual_stages",
            self.virtual_stages,
            f"{stages} with parallel.schedule = {self.schedule!r}",
        )
        if self.engine == "deepspeed":  # its pipeline engine runs 1F1B, one stage per rank, without SP
            _require(
                self.schedule == "1f1b", "parallel.schedule", self.schedule, "'1f1b' with parallel.engine = 'deepspeed'"
            )
            _require(
                not self.sequence_parallel,
                "parallel.sequence_parallel",
                True,
                "false with parallel.engine = 'deepspeed'",
            )
        _require(self.timeout_minutes > 0, "parallel.timeout_minutes", self.timeout_minutes, "> 0 (minutes)")


@dataclass
class WandbConfig:
    """Weights & Biases logging, next to metrics.jsonl and TensorBoard (pip install pangu-lm[wandb]).
    A resumed run continues the same W&B run (its id is kept in the output directory)."""

    project: str = ""  # empty: no W&B
    entity: str = ""
    name: str = ""  # default: the output directory's name
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class SpikeGuardConfig:
    """Loss-spike rollback (as the BLOOM and PaLM teams did by hand): when the loss exceeds
    `factor` x the median of the previous `window` steps for `consecutive` steps in a row, the
    run reloads the last checkpoint and skips the data it saw since then."""

    enabled: bool = False
    factor: float = 2.0
    consecutive: int = 3
    window: int = 50
    max_rollbacks: int = 3

    def validate(self) -> None:
        _require(self.factor > 1.0, "train.spike_guard.factor", self.factor, "> 1")
        _require(self.consecutive >= 1, "train.spike_guard.consecutive", self.consecutive, ">= 1")
        _require(self.window >= 1, "train.spike_guard.window", self.window, ">= 1")
        _require(self.max_rollbacks >= 0, "train.spike_guard.max_rollbacks", self.max_rollbacks, ">= 0")


@dataclass
class SdcCheckConfig:
    """Silent-data-corruption checks (docs/sdc.md). Inside every S3 step, each tensor shard's
    largest |update| / lr (before decay) against S3's bound of 1: a coordinate above it was
    computed from corrupted state or by faulty arithmetic, and is named (parameter, element, rank,
    step). Every `fingerprint_interval` steps and before every checkpoint, the ranks that hold
    weights identically compare checksums of them, and a disagreement names the rank."""

    enabled: bool = True
    # a coordinate above the bound: "skip" leaves it as it was (its m and s restart from zero) while
    # the rest of the step applies; "rollback" restores the last checkpoint and replays its batches.
    # Replicas that disagree roll back under "rollback" and stop the run under "skip"
    action: Literal["skip", "rollback"] = "skip"
    tolerance: float = 1e-4  # the bound is 1 + tolerance (fp32 rounding comes within ~1e-6 of 1)
    fingerprint_interval: int = 100  # steps; 0: no fingerprints
    max_rollbacks: int = 3

    def validate(self) -> None:
        _require(
            1e-5 <= self.tolerance <= 1.0,
            "train.sdc_check.tolerance",
            self.tolerance,
            "in [1e-5, 1] (fp32 rounding comes within ~1e-6 of the bound: a smaller tolerance would flag sound steps)",
        )
        _require(
            self.fingerprint_interval >= 0,
            "train.sdc_check.fingerprint_interval",
            self.fingerprint_interval,
            ">= 0 (0: no fingerprints)",
        )
        _require(self.max_rollbacks >= 0, "train.sdc_check.max_rollbacks", self.max_rollbacks, ">= 0")


@dataclass
class TrainConfig:
    steps: int = 100  # the length of the run: the LR schedule is laid out over it
    stop_at: int = 0  # > 0: checkpoint and exit cleanly after this step, as if preempted
    micro_batch_size: int = 1
    global_batch_size: int = 8
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1234
    output_dir: str = "runs/default"
    init_from: str = ""  # a pangu checkpoint or weights directory to start from (weights only)
    save_interval: int = 0  # 0: save only at the end (and at stop_at)
    keep_checkpoints: int = 2
    async_save: bool = False  # true: checkpoints written by a background thread as training goes on
    # checkpoints found in output_dir that cannot be used (all torn, another model shape) stop the
    # run; true: set them aside (checkpoints.set-aside-N) and train from step 0 instead
    restart: bool = False
    log_interval: int = 1
    eval_interval: int = 0  # 0: validate only at the end
    eval_batches: int = 4
    # zero/few-shot tasks (pangu/tasks/*.yaml names, task files or NAME=DATA, see docs/evaluation.md)
    # scored with every validation; results go to metrics.jsonl as task/NAME/METRIC
    eval_tasks: list[str] = field(default_factory=list)
    eval_task_examples: int = 0  # > 0: a seeded subset of this many examples per task
    compile: bool = False  # torch.compile the transformer layers (CPU and GPU)
    peak_flops: float = 0.0  # per device, for MFU; 0 measures a matmul peak on CPU, or uses a known GPU peak
    # fp16 dynamic loss scaling (as in the original recipe)
    initial_loss_scale_power: int = 32
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0
    spike_guard: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)
    sdc_check: SdcCheckConfig = field(default_factory=SdcCheckConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        self.spike_guard.validate()
        self.sdc_check.validate()
        _require(self.steps >= 1, "train.steps", self.steps, ">= 1")
        _require(
            0 <= self.stop_at <= self.steps,
            "train.stop_at",
            self.stop_at,
            f"0 (off) or a step in [1, train.steps={self.steps}]",
        )
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size, ">= 1")
        _require(self.global_batch_size >= 1, "train.global_batch_size", self.global_batch_size, ">= 1")
        _require(self.seed >= 0, "train.seed", self.seed, ">= 0")
        _require(self.peak_flops >= 0, "train.peak_flops", self.peak_flops, ">= 0 (0: measured or known)")
        # DeepSpeed keeps the initial scale as the integer 2^power, and torch multiplies a tensor
        # by an integer only below 2^63
        _require(
            0 <= self.initial_loss_scale_power <= 62,
            "train.initial_loss_scale_power",
            self.initial_loss_scale_power,
            "in [0, 62] (the fp16 loss scale starts at 2^power)",
        )
        _require(self.loss_scale_window >= 1, "train.loss_scale_window", self.loss_scale_window, ">= 1")
        _require(self.min_loss_scale > 0, "train.min_loss_scale", self.min_loss_scale, "> 0")
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            self.global_batch_size,
            f"a multiple of train.micro_batch_size ({self.micro_batch_size})",
        )
        _require(self.save_interval >= 0, "train.save_interval", self.save_interval, ">= 0")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, ">= 1")
        _require(self.log_interval >= 1, "train.log_interval", self.log_interval, ">= 1")
        _require(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, ">= 0")
        _require(self.eval_batches >= 1, "train.eval_batches", self.eval_batches, ">= 1")
        _require(self.eval_task_examples >= 0, "train.eval_task_examples", self.eval_task_examples, ">= 0 (0: all)")
        if self.spike_guard.enabled:
            _require(
                self.save_interval > 0,
                "train.save_interval",
                self.save_interval,
                "> 0 with train.spike_guard.enabled (a rollback needs recent checkpoints)",
            )
        if self.sdc_check.enabled and self.sdc_check.action == "rollback":
            _require(
                self.save_interval > 0,
                "train.save_interval",
                self.save_interval,
                "> 0 with train.sdc_check.action = 'rollback' (a rollback needs recent checkpoints)",
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.parallel.validate()
        self.optim.validate()
        self.train.validate()
        tp, pp = self.parallel.tp, self.parallel.pp
        _require(
            self.model.num_heads % tp == 0, "parallel.tp", tp, f"a divisor of model.num_heads ({self.model.num_heads})"
        )
        _require(self.model.ffn_size % tp == 0, "parallel.tp", tp, f"a divisor of the FFN size ({self.model.ffn_size})")
        _require(
            self.model.padded_vocab_size % tp == 0,
            "parallel.tp",
            tp,
            f"a divisor of the padded vocabulary ({self.model.padded_vocab_size})",
        )
        # the pipeline holds the embedding, num_layers - 1 blocks and the query layer (+ head)
        stages = pp * self.parallel.virtual_stages
        _require(
            stages <= self.model.num_layers,
            "parallel.pp" if self.parallel.virtual_stages == 1 else "parallel.pp x parallel.virtual_stages",
            stages,
            f"at most model.num_layers ({self.model.num_layers}): every stage holds a transformer layer",
        )
        if self.parallel.sequence_parallel:
            _require(
                self.model.seq_length % tp == 0,
                "parallel.sequence_parallel",
                True,
                f"model.seq_length ({self.model.seq_length}) divisible by parallel.tp ({tp})",
            )
        _require(
            self.optim.warmup_steps <= self.train.steps,
            "optim.warmup_steps",
            self.optim.warmup_steps,
            f"at most train.steps ({self.train.steps})",
        )
        for check in _CHECKS:
            check(self)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "optim": self.optim.to_dict()}

    def dump(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    """Tuples become lists so that YAML and JSON write plain sequences."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Loading: YAML -> nested dict -> overrides -> typed dataclasses, strictly.


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a file or a builtin name; the defaults when `path` is None), apply `section.key=value`
    overrides, build the typed config and validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(path)!r} is not valid UTF-8 YAML: {err}") from None
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    for override in overrides or []:
        apply_override(raw, override)
    return _build(raw, stored=False)


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the builtin configs: tiny, 350m, 2.6b, 13b, 200b


def resolve_config(path: str | Path) -> Path:
    """A config file, or the name of a builtin one (`tiny`, `2.6b`, ...)."""
    path = Path(path)
    if path.is_file():
        return path
    builtin = CONFIGS_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if len(path.parts) == 1 and builtin.is_file():
        return builtin
    names = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    problem = "is a directory, not a config file" if path.is_dir() else "does not exist"
    raise ConfigError(f"config file {str(path)!r} {problem} (builtin configs: {names})")


# keys older versions of pangu wrote into the configs they stored (checkpoints): read, then dropped
RETIRED_KEYS = (("data", "heldout_review_fraction"),)  # the builtin source's own fixed fraction now


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a config from a nested dict pangu stored (a checkpoint's), written by
    `Config.to_dict` of this or an earlier version (see `read_optim`; keys since retired are dropped)."""
    if isinstance(raw, dict):
        raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
        for section, key in RETIRED_KEYS:
            if isinstance(raw.get(section), dict):
                raw[section].pop(key, None)
    return _build(raw, stored=True)


def _build(raw: Any, stored: bool) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {raw!r}")
    config = from_dict(Config, {section: value for section, value in raw.items() if section != "optim"}, "")
    config.optim = read_optim(raw.get("optim", {}), stored)
    config.validate()
    return config
