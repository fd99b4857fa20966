"""Reproducible installs: the committed lock matches pyproject.toml, a stale lock is refused with the command that
fixes it, an unsupported transformers gets one warning naming the range, and the GPU check runs (tiny, on the CPU)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from compactvl.compat import SUPPORTED_TRANSFORMERS, check_transformers, in_range
from compactvl.errors import CompactVLWarning

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_lock_matches_pyproject():
    run = subprocess.run([sys.executable, "requirements/inputs.py", "check"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_a_stale_lock_is_refused_naming_the_command_that_regenerates_it(tmp_path):
    for name in ("run", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    py = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(py.replace('"pyyaml>=6",', '"pyyaml>=6",\n    "rich>=13",'))
    run = subprocess.run(["bash", "run", "setup"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "COMPACTVL_VENV": str(tmp_path / "v")})
    assert run.returncode == 1
    assert "requirements/lock.txt was resolved from other dependencies" in run.stderr
    assert "./run lock" in run.stderr
    assert not (tmp_path / "v").exists()  # refused before creating anything
    # a description edit is not a dependency change: the lock still applies
    (tmp_path / "pyproject.toml").write_text(py.replace("Build, train, compress", "Build, train and compress"))
    check = subprocess.run([sys.executable, "requirements/inputs.py", "check"], cwd=tmp_path, capture_output=True)
    assert check.returncode == 0


def test_transformers_range():
    lo, hi = SUPPORTED_TRANSFORMERS
    assert in_range(lo) and in_range("5.24.0") and in_range("5.40.0.dev0")
    assert not in_range("4.57.1") and not in_range(f"{hi}.0.0") and not in_range("5.16.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompactVLWarning)
        assert check_transformers("5.24.0") is None


def test_an_unsupported_transformers_gets_one_warning_at_import_naming_the_range():
    code = """
import importlib.metadata as md, warnings
real = md.version
md.version = lambda name: "4.57.1" if name == "transformers" else real(name)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import compactvl
    import compactvl.runner
mine = [str(w.message) for w in caught if issubclass(w.category, compactvl.errors.CompactVLWarning)]
print(len(mine)); print(mine[0] if mine else "")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    count, message = run.stdout.splitlines()[:2]
    assert count == "1", run.stderr
    lo, hi = SUPPORTED_TRANSFORMERS
    assert f"supports transformers >={lo},<{hi} but 4.57.1 is installed" in message


def test_gpu_check_runs_its_steps_tiny_on_the_cpu(tmp_path):
    """The script ./run gpu-check runs on a CUDA machine, exercised here with tiny shapes (the CUDA tests skip)."""
    out = tmp_path / "gc"
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rep = json.loads((out / "gpu-check.json").read_text())
    assert rep["steps"]["tests"]["status"] == "ok" and "skipped" in rep["steps"]["tests"]["summary"]
    assert rep["steps"]["train"]["status"] == "ok" and rep["steps"]["train"]["loss_finite"]
    assert rep["steps"]["bench"]["tiny"]["status"] == "ok"
    bench = json.loads((out / "bench-tiny" / "bench.json").read_text())
    assert all(r["schedule"]["matches"] is not False for r in bench["results"])
    md = (out / "gpu-check.md").read_text()
    assert "### Training throughput" in md and "compactvl bench" in md


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_cuda_skips_cleanly_and_installs_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = subprocess.run(["bash", "run", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                              "COMPACTVL_VENV": str(tmp_path / "v")})
    assert run.returncode == 0 and "no CUDA device here" in run.stderr
    assert not (tmp_path / "v").exists()
