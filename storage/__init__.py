"""agentkv storage: agents' KV blocks as safetensors files indexed in SQLite."""
