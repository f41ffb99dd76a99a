"""Export to (and import from) the Hugging Face GPTPangu layout, with pangu's own loading code.

`export_hf` writes a directory that transformers loads offline with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)`: the weights in the layout of the
public GPTPangu port (model_type "gpt_pangu", e.g. imone/pangu_2_6B, sunzeyeah/pangu-2_6B), and
next to them the project's own remote code from pangu/convert/hf_code/ (configuration_pangu.py,
modeling_pangu.py, tokenization_pangu.py: written from pangu's model and tokenizer, importing
torch, transformers, sentencepiece and jieba only, never pangu). The layout:

    transformer.wte  nn.Embedding(vocab_size, hidden)        word embedding
    transformer.wpe  nn.Embedding(max_position_embeddings, hidden)
    transformer.wqe  nn.Embedding(max_position_embeddings, hidden)   the query layer's query embedding
    transformer.h    num_layers blocks: ln_1, attn.{q,k,v,c}_proj, ln_2, mlp.{c_fc,c_proj}
                     (every projection an nn.Linear with bias, weight [out, in]). The LAST block is
                     the query layer: its attention query is q_proj(wqe(position_ids)) instead of
                     q_proj(ln_1(h)).
    transformer.ln_f nn.LayerNorm(hidden): just BEFORE the query layer (pangu's final_layernorm
                     "before", the released models and the port), or after it ("after": config.json
                     says final_layernorm "after", which only the shipped code reads)
    lm_head          nn.Linear(hidden, vocab_size, bias=False), tied to wte

pangu's `num_layers` also counts the query layer, so the mapping is a renaming, with no transposes
(pangu's linears are torch [out, in]):

    embedding.word_embeddings.weight        transformer.wte.weight (and lm_head.weight, a copy)
    embedding.position_embeddings.weight    transformer.wpe.weight
    query_layer.query_embeddings.weight     transformer.wqe.weight
    blocks.{i}.input_layernorm.*            transformer.h.{i}.ln_1.*
    blocks.{i}.attention.{query,key,value}  transformer.h.{i}.attn.{q,k,v}_proj
    blocks.{i}.attention.dense              transformer.h.{i}.attn.c_proj
    blocks.{i}.post_attention_layernorm.*   transformer.h.{i}.ln_2.*
    blocks.{i}.mlp.dense_h_to_4h            transformer.h.{i}.mlp.c_fc
    blocks.{i}.mlp.dense_4h_to_h            transformer.h.{i}.mlp.c_proj
    query_layer.*                           transformer.h.{num_layers - 1}.*
    final_layernorm.*                       transformer.ln_f.*

Vocabulary: the port's config has `vocab_size` 40000 and its wte exactly that many rows, so the
export writes the UNPADDED embedding (pangu's padding rows to a multiple of 128 are dropped);
`pad_vocab=True` keeps them, sets vocab_size to the padded size (40064, as the Megatron GPU port
stores it) and records the real one as `pangu_vocab_size` (the shipped code gives the padding rows
-inf logits, as pangu masks them). lm_head.weight is written as a copy of wte so that loaders
which do not tie weights work; `tie_lm_head=False` omits it (transformers ties it from wte by
`tie_word_embeddings`).

Activation: config.json records the checkpoint's own, "gelu" (exact erf GELU) or "quick_gelu"
(pangu's fast_gelu x*sigmoid(1.702x), the released MindSpore activation; the same function in
transformers' ACT2FN, which the Hub port calls).

Files: config.json (auto_map naming the shipped code), generation_config.json (eos <eot>, pad
<pad>), configuration_pangu.py, modeling_pangu.py, model.safetensors (or model-0000i-of-0000n
shards of at most `shard_bytes` each plus model.safetensors.index.json); with a tokenizer (the
checkpoint's, or `tokenizer=`) also vocab.model (the port's tokenizer file name),
tokenization_pangu.py and tokenizer_config.json. The safetensors files are written by streaming
one tensor at a time (the header is computed from the shapes first), so memory stays at about
one parameter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from pangu.config import ModelConfig
from pangu.convert.importer import DTYPES, check_dtype
from pangu.files import UnsafePathError, confined, write_synced
from pangu.model import declaration
from pangu.schema import from_dict

if TYPE_CHECKING:  # torch is imported when needed: the CLI builds its parser from this module
    import torch

    from pangu.checkpoint.store import TensorReader

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 1024**3  # 5 GiB, transformers' default max_shard_size
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "vocab.model"
HF_CODE = Path(__file__).resolve().parent / "hf_code"  # the remote code shipped into every export
MODEL_CODE = ("configuration_pangu.py", "modeling_pangu.py")
TOKENIZER_CODE = "tokenization_pangu.py"
EOS_ID, PAD_ID = 9, 6  # <eot> and <pad> in the released tokenizer (and in every one pangu trains)
ACTIVATION_TO_HF = {"gelu": "gelu", "fast_gelu": "quick_gelu"}
ACTIVATION_FROM_HF = {"gelu": "gelu", "quick_gelu": "fast_gelu"}
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_ITEMSIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

_LAYER_NAMES = {  # pangu sub-name in a block -> the port's
    "input_layernorm.weight": "ln_1.weight",
    "input_layernorm.bias": "ln_1.bias",
    "attention.query.weight": "attn.q_proj.weight",
    "attention.query.bias": "attn.q_proj.bias",
    "attention.key.weight": "attn.k_proj.weight",
    "attention.key.bias": "attn.k_proj.bias",
    "attention.value.weight": "attn.v_proj.weight",
    "attention.value.bias": "attn.v_proj.bias",
    "attention.dense.weight": "attn.c_proj.weight",
    "attention.dense.bias": "attn.c_proj.bias",
    "post_attention_layernorm.weight": "ln_2.weight",
    "post_attention_layernorm.bias": "ln_2.bias",
    "mlp.dense_h_to_4h.weight": "mlp.c_fc.weight",
    "mlp.dense_h_to_4h.bias": "mlp.c_fc.bias",
    "mlp.dense_4h_to_h.weight": "mlp.c_proj.weight",
    "mlp.dense_4h_to_h.bias": "mlp.c_proj.bias",
}
WORD = declaration.WORD_EMBEDDING_WEIGHT
_TOP_NAMES = {  # pangu name outside the blocks -> the port's
    WORD: "transformer.wte.weight",
    declaration.POSITION_EMBEDDING_WEIGHT: "transformer.wpe.weight",
    declaration.QUERY_EMBEDDING_WEIGHT: "transformer.wqe.weight",
    f"{declaration.FINAL_LAYERNORM}.weight": "transformer.ln_f.weight",
    f"{declaration.FINAL_LAYERNORM}.bias": "transformer.ln_f.bias",
}
LM_HEAD = "lm_head.weight"


def hf_names(num_layers: int) -> dict[str, str]:
    """pangu canonical name -> GPTPangu name, for a model of `num_layers` (counting the query layer)."""
    names = dict(_TOP_NAMES)
    for i in range(num_layers - 1):
        names.update(
            {f"{declaration.block_name(i)}.{sub}": f"transformer.h.{i}.{hf}" for sub, hf in _LAYER_NAMES.items()}
        )
    query = num_layers - 1
    names.update(
        {f"{declaration.QUERY_LAYER}.{sub}": f"transformer.h.{query}.{hf}" for sub, hf in _LAYER_NAMES.items()}
    )
    return names


def hf_config(
    model: ModelConfig, *, vocab_rows: int, torch_dtype: str, eos_id: int = EOS_ID, pad_id: int = PAD_ID
) -> dict:
    """config.json of the GPTPangu layout for a pangu model, naming the shipped code."""
    return {
        "architectures": ["GPTPanguForCausalLM"],
        "model_type": "gpt_pangu",
        "auto_map": {
            "AutoConfig": "configuration_pangu.GPTPanguConfig",
            "AutoModel": "modeling_pangu.GPTPanguModel",
            "AutoModelForCausalLM": "modeling_pangu.GPTPanguForCausalLM",
        },
        "vocab_size": vocab_rows,
        "max_position_embeddings": model.seq_length,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_size,
        "num_layers": model.num_layers,
        "num_heads": model.num_heads,
        "activation_function": ACTIVATION_TO_HF[model.activation],
        "final_layernorm": model.final_layernorm,
        "resid_pdrop": model.dropout,
        "embd_pdrop": model.dropout,
        "attn_pdrop": model.attention_dropout_rate,
        "layer_norm_epsilon": model.layernorm_eps,
        "scale_attn_weights": True,
        "initializer_range": model.init_std,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": True,
        "torch_dtype": torch_dtype,
    }


# ---------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class _Planned:
    hf_name: str
    pangu_name: str
    shape: tuple[int, ...]
    rows: int | None  # read only the first `rows` rows (the unpadded vocabulary)

    def nbytes(self, dtype: str) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * _ITEMSIZES[dtype]


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: str | None = None,
    pad_vocab: bool = False,
    tie_lm_head: bool = True,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write a pangu checkpoint (any kind and layout: weights-only, or a training checkpoint with
    tensor/pipeline-parallel pieces; a run or checkpoints directory resolves to its latest) as a
    GPTPangu Hugging Face model directory `out` that transformers loads with trust_remote_code.
    Returns `out`.

    `dtype` ("float32", "float16", "bfloat16"; default: the stored dtype, or where the stored dtypes
    differ the one holding most of the bytes). `shard_bytes`: the largest safetensors file (a single
    larger tensor gets a file of its own). `tokenizer`: a SentencePiece model to ship (default: the
    checkpoint's own; without either, the directory has no tokenizer). See the module docstring for
    the layout, vocabulary and activation choices.
    """
    from pangu.checkpoint import format as fmt
    from pangu.checkpoint.store import CheckpointError

    path = fmt.resolve(checkpoint)
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists: choose a new output directory")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    manifest = fmt.read_manifest(path)
    model = manifest.model
    if getattr(model, "scale_invariant", False):
        raise CheckpointError(f"{path} is a scale-invariant variant, which the GPTPangu port cannot represent")
    if model.activation not in ACTIVATION_TO_HF:
        raise CheckpointError(f"{path}: activation {model.activation!r} has no GPTPangu equivalent")
    if model.final_layernorm != "before":
        logger.info(
            "%s applies the final LayerNorm after the query layer: config.json says final_layernorm "
            "'after', which the shipped modeling_pangu.py reads (the Hub port's code would not)",
            path,
        )
    if tokenizer is not None:
        tokenizer_name, tokenizer_bytes = str(tokenizer), _read_tokenizer_file(Path(tokenizer))
    else:
        tokenizer_name, tokenizer_bytes = str(path / "tokenizer.model"), fmt.read_tokenizer(path, manifest)
    eos_id, pad_id = EOS_ID, PAD_ID
    if tokenizer_bytes is not None:
        eos_id, pad_id = _check_tokenizer(tokenizer_bytes, tokenizer_name, model)
    else:
        logger.warning("%s carries no tokenizer: the export has none (give one with --tokenizer)", path)

    reader = fmt.tensor_reader(path, manifest)
    names = hf_names(model.num_layers)
    declared = [p.name for p in declaration.parameters(model)]
    unmapped = [name for name in declared if name not in names]
    if unmapped:
        raise CheckpointError(f"{path}: parameters the GPTPangu port has no place for: {unmapped[:5]}")
    missing = sorted(set(declared) - reader.names())
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks parameters {missing[:5]}")
    vocab_rows = model.padded_vocab_size if pad_vocab else model.vocab_size
    plan: list[_Planned] = []
    for pangu_name, hf_name in names.items():
        shape = reader.full_shape(pangu_name)
        rows = None
        if pangu_name == WORD:
            if shape[0] < vocab_rows:
                raise CheckpointError(f"{path}: the word embedding has {shape[0]} rows, fewer than {vocab_rows}")
            rows, shape = vocab_rows, (vocab_rows, *shape[1:])
        plan.append(_Planned(hf_name, pangu_name, tuple(shape), rows))
    if tie_lm_head:
        word = next(p for p in plan if p.pangu_name == WORD)
        plan.insert(1, _Planned(LM_HEAD, WORD, word.shape, word.rows))

    if dtype is not None:
        check_dtype(dtype)
        target = dtype
    else:  # the dtype holding most of the bytes (an imported release: fp16 blocks, fp32 .npy embeddings)
        stored_bytes: dict[str, int] = {}
        for item in plan:
            stored = reader.dtype(item.pangu_name)
            stored_bytes[stored] = stored_bytes.get(stored, 0) + item.nbytes(stored)
        target = max(stored_bytes, key=stored_bytes.get)
    if target not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"cannot export tensors of dtype {target}")

    shards = _plan_shards(plan, target, shard_bytes)
    tmp = fmt.temporary_beside(out)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        progress = tqdm(total=len(plan), desc="exporting", unit="tensor", disable=None)
        for i, shard in enumerate(shards):
            file_name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += _write_safetensors(tmp / file_name, shard, target, reader, progress)
            weight_map.update({p.hf_name: file_name for p in shard})
        progress.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(tmp / INDEX_FILE, index)
        config = hf_config(model, vocab_rows=vocab_rows, torch_dtype=target, eos_id=eos_id, pad_id=pad_id)
        if vocab_rows != model.vocab_size:  # padded rows: the real vocabulary (masked by the shipped code)
            config["pangu_vocab_size"] = model.vocab_size
        _write_json(tmp / "config.json", config)
        _write_json(
            tmp / "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
        )
        for name in MODEL_CODE:
            write_synced(tmp / name, (HF_CODE / name).read_bytes())
        if tokenizer_bytes is not None:
            write_synced(tmp / TOKENIZER_FILE, tokenizer_bytes)
            write_synced(tmp / TOKENIZER_CODE, (HF_CODE / TOKENIZER_CODE).read_bytes())
            _write_json(tmp / "tokenizer_config.json", tokenizer_config(model))
        fmt.publish_new(tmp, out)
    except BaseException:
        fmt.discard(tmp)
        raise
    finally:
        reader.close()
    logger.info("exported %s to %s: %d tensors in %d file(s), %d bytes", path, out, len(plan), len(shards), total)
    return out


def tokenizer_config(model: ModelConfig) -> dict:
    """tokenizer_config.json naming the shipped tokenization_pangu.py (PanGu's jieba + SentencePiece)."""
    return {
        "tokenizer_class": "GPTPanguTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_pangu.GPTPanguTokenizer", None]},
        "eos_token": "<eot>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "padding_side": "left",
        "model_max_length": model.seq_length,
        "clean_up_tokenization_spaces": False,
    }


def _read_tokenizer_file(file: Path) -> bytes:
    """The bytes of a tokenizer model given on the command line."""
    from pangu.data.tokenizer import PanguTokenizer

    return PanguTokenizer.from_file(file).model_bytes  # a missing file: one line naming it


def _check_tokenizer(model_bytes: bytes, name: str, model: ModelConfig) -> tuple[int, int]:
    """(eos, pad) ids of a tokenizer to ship, after checking that it is one the PanGu scheme uses
    and that its ids fit the model's vocabulary."""
    from pangu.checkpoint.store import CheckpointError
    from pangu.data.tokenizer import PanguTokenizer

    tok = PanguTokenizer(model_bytes, name)
    if tok.vocab_size > model.vocab_size:
        raise CheckpointError(f"tokenizer {name} has {tok.vocab_size} pieces, the model only {model.vocab_size}")
    return tok.eod_id, tok.pad_id


def _write_json(file: Path, value: dict) -> None:
    write_synced(file, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def _plan_shards(plan: list[_Planned], dtype: str, shard_bytes: int) -> list[list[_Planned]]:
    shards: list[list[_Planned]] = [[]]
    size = 0
    for item in plan:
        nbytes = item.nbytes(dtype)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _write_safetensors(file: Path, items: list[_Planned], dtype: str, reader: TensorReader, progress: tqdm) -> int:
    """One safetensors file, its header computed from the shapes, then each tensor streamed in."""
    import torch

    from pangu.checkpoint.store import CheckpointError

    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        nbytes = item.nbytes(dtype)
        header[item.hf_name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data to 8 bytes, as safetensors does
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for item in items:
            index = None
            if item.rows is not None:
                index = (slice(0, item.rows),) + tuple(slice(0, n) for n in item.shape[1:])
            tensor = reader.read(item.pangu_name, "weight", index).to(getattr(torch, dtype)).contiguous()
            if tuple(tensor.shape) != item.shape:
                raise CheckpointError(f"{item.pangu_name}: read shape {tuple(tensor.shape)}, expected {item.shape}")
            f.write(memoryview(tensor.view(torch.uint8).numpy()))
            del tensor
            progress.update()
        f.flush()
        os.fsync(f.fileno())
    return offset


# ---------------------------------------------------------------------------------------------
# Import (the inverse), for round trips and for starting from a GPTPangu model


@dataclass(frozen=True)
class _HFConfig:
    """The fields of a GPTPangu config.json that pangu reads (it may hold others)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    max_position_embeddings: int
    intermediate_size: int | None = None
    activation_function: str = "gelu"
    final_layernorm: str = "before"  # written by export_hf; the Hub port's configs lack it
    resid_pdrop: float = 0.1
    attn_pdrop: float | None = None
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    pangu_vocab_size: int | None = None  # written by export_hf(pad_vocab=True)


@dataclass(frozen=True)
class _HFIndex:
    """model.safetensors.index.json: which file holds each tensor."""

    weight_map: dict[str, str]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def _read_hf_json(cls: type, file: Path):
    """A JSON file of a Hugging Face directory as the typed `cls` (keys pangu does not read are
    left out); a damaged one is a CheckpointError naming the file."""
    from pangu.checkpoint.store import CheckpointError

    try:
        raw = json.loads(file.read_bytes())
        if isinstance(raw, dict):
            raw = {key: value for key, value in raw.items() if key in {f.name for f in dataclasses.fields(cls)}}
        return from_dict(cls, raw, "", document=file.name)
    except (ValueError, RecursionError) as err:  # JSON, UTF-8 and ConfigError are ValueErrors
        raise CheckpointError(f"{file} cannot be read: {err}") from None


def _read_hf_tensors(src: Path) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """(names, get(name) -> tensor) over model.safetensors or the shards of an index (every file
    it names inside `src`)."""
    from safetensors import SafetensorError, safe_open

    from pangu.checkpoint.store import CheckpointError

    def opened(file_name: str):
        try:
            return safe_open(confined(src, file_name), framework="pt")
        except (UnsafePathError, SafetensorError, OSError) as err:
            raise CheckpointError(f"{src / file_name} cannot be read as safetensors: {err}") from None

    if (src / INDEX_FILE).is_file():
        weight_map = _read_hf_json(_HFIndex, src / INDEX_FILE).weight_map
    elif (src / SINGLE_FILE).is_file():
        with opened(SINGLE_FILE) as f:
            weight_map = {name: SINGLE_FILE for name in f.keys()}
    else:
        raise CheckpointError(
            f"{src} has neither {SINGLE_FILE} nor {INDEX_FILE} (pytorch_model.bin checkpoints "
            f"are not read: convert them to safetensors first)"
        )

    def get(name: str) -> torch.Tensor:
        with opened(weight_map[name]) as f:
            try:
                return f.get_tensor(name)
            except SafetensorError as err:
                raise CheckpointError(f"{src / weight_map[name]}: {name} cannot be read: {err}") from None

    return list(weight_map), get


def import_hf(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """A GPTPangu Hugging Face directory (config.json + safetensors) -> a pangu weights checkpoint.

    The activation comes from config.json ("gelu" or "quick_gelu" = fast_gelu), and so does the
    final LayerNorm's place (`final_layernorm`, written by `export_hf`; "before" the query layer
    where it is absent, as in the Hub port's configs). `vocab_size` defaults to config.json's (or its
    `pangu_vocab_size`, written by `export_hf(pad_vocab=True)`). lm_head.weight,
    if present, must equal the word embedding (pangu ties them). A vocab.model next to the
    weights (or `tokenizer`) is shipped with the checkpoint.
    """
    import torch

    from pangu.checkpoint.format import declared_shapes
    from pangu.checkpoint.store import CheckpointError
    from pangu.checkpoint.weights import write_weights

    src, out = Path(src), Path(out)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist: is {src} a Hugging Face GPTPangu directory?")
    config = _read_hf_json(_HFConfig, config_path)
    if config.model_type != "gpt_pangu":
        raise CheckpointError(f"{config_path}: model_type {config.model_type!r} is not 'gpt_pangu'")
    activation = ACTIVATION_FROM_HF.get(config.activation_function)
    if activation is None:
        raise CheckpointError(
            f"{config_path}: activation_function {config.activation_function!r} is not one "
            f"pangu has ({', '.join(ACTIVATION_FROM_HF)})"
        )
    if config.final_layernorm not in ("before", "after"):
        raise CheckpointError(
            f"{config_path}: final_layernorm {config.final_layernorm!r} is neither 'before' nor 'after'"
        )
    model = ModelConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        ffn_hidden_size=config.intermediate_size or 4 * config.hidden_size,
        vocab_size=vocab_size or config.pangu_vocab_size or config.vocab_size,
        seq_length=config.max_position_embeddings,
        activation=activation,
        final_layernorm=config.final_layernorm,
        dropout=config.resid_pdrop,
        layernorm_eps=config.layer_norm_epsilon,
        init_std=config.initializer_range,
    )
    if config.attn_pdrop is not None and config.attn_pdrop != model.dropout:
        model = dataclasses.replace(model, attention_dropout=config.attn_pdrop)
    model.validate()
    check_dtype(dtype)
    target = getattr(torch, dtype) if dtype else None
    names, get = _read_hf_tensors(src)
    stored_layers = {m[1] for name in names if (m := re.match(r"transformer\.h\.(\d+)\.", name))}
    if len(stored_layers) != model.num_layers:  # before anything is built per layer
        raise CheckpointError(
            f"{config_path} says num_layers {model.num_layers}, the weights hold {len(stored_layers)} layers"
        )
    pangu_of = {hf: pangu for pangu, hf in hf_names(model.num_layers).items()}
    unknown = [
        n for n in names if n not in pangu_of and n != LM_HEAD and not n.endswith(("attn.bias", "attn.masked_bias"))
    ]
    if unknown:
        raise CheckpointError(f"{src}: tensors the GPTPangu layout does not have: {unknown[:5]}")
    missing = sorted(set(pangu_of) - set(names))
    if missing:
        raise CheckpointError(f"{src}: lacks {missing[:5]}")
    declared = declared_shapes(model)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, pangu_name in pangu_of.items():
            tensor = get(hf_name)
            if pangu_name == WORD:
                if LM_HEAD in names and not torch.equal(get(LM_HEAD), tensor):
                    raise CheckpointError(
                        f"{src}: lm_head.weight differs from transformer.wte.weight; pangu ties "
                        f"the head to the word embedding"
                    )
                if not model.vocab_size <= tensor.shape[0] <= model.padded_vocab_size:
                    raise CheckpointError(f"{src}: {tensor.shape[0]} embedding rows for vocab_size {model.vocab_size}")
                padding = model.padded_vocab_size - tensor.shape[0]
                if padding:
                    tensor = torch.cat([tensor, tensor.new_zeros(padding, *tensor.shape[1:])])
            if tuple(tensor.shape) != declared[pangu_name]:
                raise CheckpointError(
                    f"{src}: {hf_name} has the shape {list(tensor.shape)}, the model of {config_path} needs "
                    f"{list(declared[pangu_name])}"
                )
            if target is None and str(tensor.dtype).removeprefix("torch.") not in DTYPES:
                raise CheckpointError(f"{src}: {hf_name} is {tensor.dtype}: give --dtype (one of {', '.join(DTYPES)})")
            yield pangu_name, tensor if target is None else tensor.to(target)

    tokenizer_path = (
        Path(tokenizer) if tokenizer else (src / TOKENIZER_FILE if (src / TOKENIZER_FILE).is_file() else None)
    )
    return write_weights(out, model, tensors(), tokenizer_path)
