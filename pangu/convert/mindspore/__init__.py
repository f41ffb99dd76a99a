"""PanGu-α's MindSpore formats, read (and written, for tests and round trips) without MindSpore.

    wire.py      the protobuf wire format, the little of it these files need
    ckpt.py      checkpoints (.ckpt): the one record scanner, the readers built on it, the writer
    strategy.py  parallel-strategy files, and the slice of a full tensor each device holds
    names.py     MindSpore names and layouts <-> pangu's canonical ones (pangu/model/declaration.py)
    release.py   merging the sliced 2.6B / 13B release into full tensors

pangu/convert/importer.py (`pangu convert import-mindspore`) puts them together.
"""
