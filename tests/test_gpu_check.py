"""benchmarks/gpu_check.sh --dry-run: every section of the one-GPU check runs on the CPU at toy
shapes and reports what the GPU run will (the GPU figures themselves need a GPU)."""

import json
import os
import sys
from pathlib import Path

import pytest
from process_helpers import run_ok

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_section(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = run_ok(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], env, timeout=900, cwd=ROOT
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert summary["dry_run"] and summary["ok"]
    checks = summary["checks"]
    assert set(checks["blocked_vs_dense"]) == {
        f"{s}_{d}" for s in ("stage1", "stage2") for d in ("float32", "bfloat16")
    }
    assert all(c["rel_err"] <= c["tol"] for c in checks["blocked_vs_dense"].values())
    assert checks["kv_cache"]["same_tokens"]
    for dtype in ("bfloat16", "float16"):
        c = checks["low_precision_step"][dtype]
        assert 0 < c["loss_rel_err"] <= c["loss_tol"] and 0 < c["grad_rel_err"] <= c["grad_tol"]
    train = summary["train"]
    assert train["layers"] == train["of_layers"] == 2 and train["micro_batch"] == 4
    assert train["tokens_per_s"] > 0 and train["planned_peak_gib"] > 0 and train["skipped_steps"] == 0
    assert summary["sample"]["cached_tokens_per_s"] > 0 and summary["sample"]["uncached_tokens_per_s"] > 0
