"""Memory of an IFT hypergradient is constant in the number of Neumann / CG steps.

Each measurement runs in a fresh process and reports how much the peak RSS grew
during one hypergradient of a ~0.5M-weight MLP. Unrolled differentiation is the
positive control: its memory must grow with K, which shows the probe can see it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("_memory_probe.py")


def peak_growth_mb(method: str, steps: int) -> float:
    # a fixed mmap threshold makes glibc return freed weight-sized blocks, so RSS tracks live tensors
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        PYTHONPATH=os.pathsep.join([str(PROBE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    out = subprocess.run(
        [sys.executable, str(PROBE), method, str(steps)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["neumann", "cg"])
def test_memory_flat_in_solver_steps(method):
    m5, m50 = peak_growth_mb(method, 5), peak_growth_mb(method, 50)
    assert m50 <= 1.10 * m5 + 4.0, (m5, m50)


def test_unrolled_memory_grows_with_steps():
    m5, m50 = peak_growth_mb("unrolled", 5), peak_growth_mb("unrolled", 50)
    assert m50 > 4 * m5, (m5, m50)
