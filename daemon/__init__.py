"""agentkv daemon: the model, the block pool and the engine."""
