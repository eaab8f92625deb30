"""DaemonOptions travel to the detached daemon whole, as JSON: never parsed as flags again."""

from __future__ import annotations

from pathlib import Path

from agentkv.daemon.service.process import EXIT_USAGE, DaemonOptions, main


def test_options_round_trip_through_json_with_every_field():
    opts = DaemonOptions(
        model="/models/x",
        store=Path("/tmp/store"),
        socket="tcp://127.0.0.1:5555",
        memory_budget=3 << 20,
        disk_budget=7 << 30,
        pool_blocks=12,
        block_size=16,
        auth_key=Path("/tmp/key"),
        cancel_on_shutdown=True,
        prefill_step_size=64,  # no flag of its own: argv used to drop it
        client_ttl=2.5,
    )
    back = DaemonOptions.from_json(opts.to_json())
    assert back == opts and isinstance(back.store, Path) and isinstance(back.auth_key, Path)
    assert DaemonOptions.from_json(DaemonOptions().to_json()) == DaemonOptions()


def test_the_daemon_entry_point_refuses_what_is_not_its_options(capsys):
    for argv in ([], ["{"], ['{"bogus": 1}'], ["[1, 2]"], ['{"block_size": 1}', "extra"]):
        assert main(argv) == EXIT_USAGE, argv
        assert capsys.readouterr().err.startswith("Error: "), argv
