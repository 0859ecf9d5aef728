"""The committed GPU check's CPU path, and the decoders' GroupNorm route that it chose for CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsevar.group_norm import GroupNorm, group_norm_wide

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_group_norm_is_torchs_up_to_float32_rounding(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 16, 24, generator=gen) * 3 + 1).to(dtype)
    weight, bias = torch.randn(64, generator=gen).to(dtype), torch.randn(64, generator=gen).to(dtype)
    expected = F.group_norm(x.float(), 32, weight.float(), bias.float(), 1e-6)
    wide = group_norm_wide(x, 32, weight, bias, 1e-6, torch.float32)
    assert wide.dtype == torch.float32 and wide.shape == x.shape
    assert (wide - expected).abs().max() < 1e-5
    assert group_norm_wide(x, 32, weight, bias, 1e-6, dtype).dtype == dtype


def test_group_norm_keeps_torchs_names_and_cpu_bytes():
    norm = GroupNorm(32, 64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    assert list(norm.state_dict()) == list(torch.nn.GroupNorm(32, 64).state_dict())
    x = torch.randn(1, 64, 8, 8)
    assert torch.equal(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, 1e-6))  # the CPU runs torch's own


def test_run_sh_without_a_gpu_runs_the_smoke_check_and_writes_its_files(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with a GPU run.sh runs the full-size rows, minutes long")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "scripts/gpu/run.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no CUDA device, smoke run only" in done.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "smoke.json", "smoke.log", "smoke.md"]
    assert "torch" in (out / "env.txt").read_text()
    rows = json.loads((out / "smoke.json").read_text())["rows"]
    assert {(r["model"], r["graphs"]) for r in rows} == {(m, g) for m in ("infinity-2b", "hart-0.7b")
                                                         for g in (False, True)}
    assert "| infinity-2b | 2 | dense graphs |" in (out / "smoke.md").read_text()
    # the other speed-ups: eager rows; only the stage skip (no tensors changed mid-way) in graph mode too
    eager = {r["setting"] for r in rows if not r["graphs"]}
    graphed = {r["setting"] for r in rows if r["graphs"]}
    assert {"FastVAR, HART-0.7B's shape", "dense, last 1 skipped", "dense, guidance on stages 1-6"} <= eager
    assert "dense, last 1 skipped" in graphed and not any("FastVAR" in s or "guidance" in s for s in graphed)
