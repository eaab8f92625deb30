"""agentkv client: the wire protocol and the Python client (pure Python, never imports mlx)."""
