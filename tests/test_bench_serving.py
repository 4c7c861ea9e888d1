"""experiments/bench_serving.py --smoke: every code path of the serving benchmark on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_serving_smoke(tmp_path):
  out = tmp_path / "serving.json"
  torch_python = os.environ.get("MOA_TORCH_PYTHON", sys.executable)
  proc = subprocess.run(
    [
      sys.executable,
      str(REPO / "experiments" / "bench_serving.py"),
      "--smoke",
      "--out",
      str(out),
      "--torch_python",
      torch_python,
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
  assert set(records) == {"dense", "moa-0.5", "moa-0.25", "hf"}
  for method in ("dense", "moa-0.5", "moa-0.25"):
    r = records[method]
    assert "error" not in r, r
    assert r["batch"] >= 1 and r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0
    assert r["chunked_logits_max_abs_diff"] < 1e-4 * max(1.0, r["logits_max_abs"])
  assert records["dense"]["kv_ratio_vs_dense"] == 1.0
  for method in ("moa-0.5", "moa-0.25"):  # a smaller cache per row: a larger batch
    assert records[method]["kv_ratio_vs_dense"] < 0.55
    assert records[method]["batch"] > records["dense"]["batch"]
  hf = records["hf"]
  assert "skipped" in hf or ("error" not in hf and hf["decode_tokens_per_s"] > 0), hf
  assert proc.stdout.rstrip().splitlines()[-1].startswith("wrote ")
  assert "| model | prompt |" in proc.stdout
