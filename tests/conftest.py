"""Shared fixtures: the project root, the real-sample folder (skip when absent), a runner for the CLI."""
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("DEEPLENSE_SAMPLES", ROOT.parent / "shared" / "deeplense_samples"))
# Several xdist workers share the cores: one torch thread per process (before torch is imported here or in the CLI's
# subprocesses). Two workers of two spinning OpenMP threads each on two cores run several times slower.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1: os.environ.setdefault("OMP_NUM_THREADS", "1")

@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT

@pytest.fixture(scope="session")
def real_samples() -> Path:
    "The real DeepLense sample files in ../shared/deeplense_samples; the test is skipped when they are absent."
    if not (SAMPLES / "common_test_I").is_dir(): pytest.skip(f"real DeepLense samples not found at {SAMPLES}")
    return SAMPLES

def run_cli(*args, check=True, timeout=600, env=None, cwd=None):
    "Run `deeplense ARGS` in a subprocess of this interpreter; returns the CompletedProcess."
    cmd = [sys.executable, "-m", "deeplense_nb.cli", *map(str, args)]
    e = {**os.environ, "MPLBACKEND": "Agg", **(env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r

@pytest.fixture
def cli():
    return run_cli
