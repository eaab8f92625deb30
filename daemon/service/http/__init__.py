"""The HTTP front: OpenAI- and Anthropic-compatible endpoints over the daemon's socket.

It runs as its own process (`python -m agentkv.daemon.service.http`, started and stopped
with the daemon by `daemonctl start --http HOST:PORT`), a starlette app under uvicorn that
talks to the daemon as one more client through `AsyncClient`: the engine thread never
blocks on HTTP and the two never share a GIL. No MLX here: the daemon renders `messages`
with the model's chat template (its `messages=` path reuses the longest common token prefix
with the agent's context).
"""
