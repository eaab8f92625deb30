"""Tensor parallelism over mx.distributed: one daemon whose model, pool and store are
split by KV heads over several ranks (processes or machines) run in lockstep.

- `build`: the group, this rank's shard of the model, its engine and store.
- `channel`: rank 0's messages to every rank, agreement, a watchdog on collectives.
- `lockstep`: `LockstepEngine` (rank 0) and `follow` (the other ranks).
- `reconcile`: at start, every rank's store agrees with rank 0's index.
- `durability`: `durable` means on every rank's disk (the ranks agree on their writes).

The service side (`agentkv.daemon.service.ranks`) starts the ranks.
"""
