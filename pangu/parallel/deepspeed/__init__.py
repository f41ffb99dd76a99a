"""The DeepSpeed engine (engine.py): DeepSpeed's PipelineEngine with ZeRO stage 1, megatron-core's
tensor-parallel layers (megatron.py), the stage pipeline (pipeline.py) and where DeepSpeed keeps
what checkpoints read and write (state.py). The only package that imports DeepSpeed."""
