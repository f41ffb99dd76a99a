"""The data pipeline: raw text -> clean documents -> token shards -> packed samples -> global batches.

Modules, in the order the data flows through them:

- `builtin`   the builtin corpus (People's Daily, reviews) and the reviews it holds out for evaluation
- `sources`   reads documents as streams (builtin corpus, local json/jsonl/parquet/text files,
              compressed too; long documents cut) and cuts the corpus into pieces, the unit of
              work of `prepare`
- `cleaning`  normalises whitespace, filters unencodable / short / non-Chinese documents
- `minhash`   MinHash LSH keys for near-duplicate removal (data.near_dedup)
- `dedup`     exact and near deduplication over the whole corpus, partitioned by key, its files
              grouped so that their opens grow with pieces + buckets
- `tokenizer` the PanGu-alpha tokenizer (jieba pre-segmentation + SentencePiece), and its trainer
- `pieces`    what a worker process does with one piece or one shard
- `indexed`   memory-mapped token shards (`NAME.bin` + `NAME.idx`)
- `prepare`   runs all of the above, on any number of processes and nodes, resumably, into a
              self-contained prepared directory
- `prepared`  reads a prepared directory back (`load_prepared`, `load_tokenizer`)
- `cache`     index arrays built once (by one process), cached beside the shards, memory-mapped
              by every rank
- `dataset`   packs a source's shards into fixed-length samples, blends sources, reads batches
              (token ids checked against the model's vocabulary), builds batches
- `sampler`   the resumable, layout-independent order in which samples are consumed

Nothing here knows about the model or torch.distributed: the output is numpy arrays, and a
multi-process prepare gets its process group from the caller (`prepare.Group`).
"""

from pangu.schema import PanguError


class DataError(PanguError, ValueError):
    """Bad input data or a damaged prepared directory. The message names the file or config field
    and says how to fix it."""
