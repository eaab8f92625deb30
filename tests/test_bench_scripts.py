"""The benchmark scripts' own logic: real parameter counts of quantized models, and the
report that puts a real model's rows beside the synthetic ones without re-running those."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.nn as nn

from agentkv.daemon.engine.model_factory import load_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_report import VARIANTS, discover  # noqa: E402
from bench_ttft import model_size  # noqa: E402


def test_model_size_counts_the_values_packed_in_quantized_weights():
    model, _ = load_model()
    full, kind = model_size(model)
    assert kind == "float32" and full > 500_000
    nn.quantize(model, group_size=32, bits=4)  # uint32 words of 8 values, plus scales, biases
    quantized, kind = model_size(model)
    assert quantized == full  # the same parameters, whatever their storage
    assert kind == "4-bit+float32"  # the norms stay float32


def test_variants_run_their_script_with_a_model():
    found = {b.name: b for b in discover(None, [])}
    for name, (base, args, model) in VARIANTS.items():
        assert found[name].script == found[base].script
        assert found[name].args == args and found[name].model == model
    assert {b.name for b in discover(["ttft-smollm2"], [])} == {"ttft-smollm2"}


def test_report_merges_real_model_rows_with_the_synthetic_ones(tmp_path):
    for name in ("ttft", "restore", "ttft-smollm2", "restore-smollm2"):
        shutil.copy(ROOT / "bench" / f"{name}.json", tmp_path)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_report.py"), "--no-run", "--no-plots"]
    subprocess.run([*cmd, "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    report = (tmp_path / "REPORT.md").read_text()
    synthetic = json.loads((tmp_path / "ttft.json").read_text())["rows"][0]["ttft_ms"]
    real = json.loads((tmp_path / "ttft-smollm2.json").read_text())["rows"][0]["ttft_ms"]
    section = report.split("## A real model: SmolLM2-135M-Instruct")
    assert len(section) == 2
    assert f"{synthetic:,.0f}" in section[0]  # the synthetic table, from its own JSON
    assert f"{real:,.0f}" in section[1] and "3 KV heads x 64" in section[1]
    assert "Restore of one agent from disk" in section[1] and "1,024-token agent" in section[1]
