import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

DATA = Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # a command run in-process may have chosen its own (``--threads auto``)


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA / "uci").is_dir():
        pytest.skip(f"shared benchmark data not found at {DATA} (set BILEVEL_DATA)")
    return DATA
