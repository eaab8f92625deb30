"""scripts/bench_serving.py --quick end to end (~1 minute: two servers, two restarts each),
with AGENTKV_FULL=1: both servers answer the same workload, greedy text agrees, and the
report holds every measurement the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from refs import FULL

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not FULL, reason="starts mlx_lm.server and agentkv twice; AGENTKV_FULL=1")
def test_bench_serving_quick(tmp_path):
    out = tmp_path / "serving.json"
    script = ROOT / "scripts" / "bench_serving.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())["result"]
    runs = result["runs"]
    assert set(runs) == {f"{s} x{n}" for s in ("agentkv", "mlx_lm.server") for n in (1, 2)}
    for r in runs.values():
        assert set(r["ttft_by_turn"]) == {"0", "1"} and r["tokens_per_s"] > 0
        assert r["restart_ttft"]["p50_ms"] > 0 and r["history_tokens_at_restart"] > 0
    assert result["same_greedy_text_agent0"]["1"] is True
    assert result["same_text_target_met"] is True
    assert result["http_vs_zmq"]["ratio"] > 0
