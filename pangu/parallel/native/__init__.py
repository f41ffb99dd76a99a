"""The torch engine (engine.py): torch.distributed.pipelining schedules over pangu's stages, DTensor
tensor and sequence parallelism (layers.py), FSDP2 sharding of parameters, gradients and optimizer
state with fp32 reduce-scatters overlapped with backward."""
