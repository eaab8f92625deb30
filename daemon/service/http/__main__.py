"""`python -m agentkv.daemon.service.http`: the HTTP front's process (the daemon starts
it for `daemonctl start --http`; it can also run by hand beside a running daemon)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from agentkv.client import protocol

from .app import FrontConfig, make_app
from .listen import ListenError, parse_listen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m agentkv.daemon.service.http")
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--socket", required=True, help="the daemon's socket")
    p.add_argument("--auth-key", type=Path, help="the daemon's --auth-key file")
    p.add_argument("--api-key", type=Path, help="file holding the HTTP API key")
    p.add_argument("--parent-pid", type=int, help="stop when this process is gone")
    args = p.parse_args(argv)
    try:
        api_key = protocol.load_key(args.api_key) if args.api_key else None
        host, port = parse_listen(args.listen, api_key is not None)
    except (OSError, protocol.ProtocolError, ListenError) as exc:
        sys.exit(f"agentkv http: {exc}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level="INFO")
    config = FrontConfig(args.socket, args.auth_key, api_key, parent_pid=args.parent_pid)
    uvicorn.Server(
        uvicorn.Config(
            make_app(config),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
        )
    ).run()


if __name__ == "__main__":
    main()
