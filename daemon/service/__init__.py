"""The service: the daemon process, the ZeroMQ I/O loop, the request layer and `daemonctl`.

No module here imports MLX at module level: `daemonctl status`, `stop` and the other
commands that only talk to a daemon start in a fraction of a second. The daemon process
imports the engine (`agentkv.daemon.engine`) when it loads the model.
"""
