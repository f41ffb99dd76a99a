"""The data pipeline: raw text -> clean documents -> token shards -> packed samples -> global batches.

Modules, in the order the data flows through them:

- `sources`   reads documents from the builtin corpus or local json/jsonl/parquet/text files
- `cleaning`  normalises whitespace, filters short / non-Chinese documents, removes exact duplicates
- `tokenizer` the PanGu-alpha tokenizer (jieba pre-segmentation + SentencePiece), and its trainer
- `indexed`   memory-mapped token shards (`NAME.bin` + `NAME.idx`)
- `prepare`   runs all of the above once into a self-contained prepared directory; loads it back
- `dataset`   packs a shard's token stream into fixed-length samples, blends sources, builds batches
- `sampler`   the resumable, layout-independent order in which samples are consumed

Nothing here knows about the model or torch.distributed: the output is numpy arrays.
"""

from pangu.config import PanguError


class DataError(PanguError, ValueError):
    """Bad input data or a damaged prepared directory. The message names the file or config field
    and says how to fix it."""
