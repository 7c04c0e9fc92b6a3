"""The README's library example runs and its hypergradient matches the exact IFT answer."""

import re
from pathlib import Path

import torch

import bilevel as B

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_is_right():
    code = re.search(r"## The low-level contract.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), ns)
    g, p, h = ns["g"], ns["p"], ns["h"]
    exact = B.hypergradient(ns["outer"], p, h, inner=ns["inner"], solver=B.Exact())
    assert g["log_wd"].shape == h["log_wd"].shape
    # 200 SGD steps leave w near w*: the Neumann answer is close to the exact IFT one at those weights
    assert torch.nn.functional.cosine_similarity(g["log_wd"], exact["log_wd"], dim=0) > 0.99


def test_readme_commands_match_ci():
    readme = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    setup = re.search(r"## Set-up.*?```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    tests = re.search(r"## Tests.*?```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    assert setup in ci and tests in ci


def test_readme_front_door_runs_and_tunes(monkeypatch):
    """The README's front-door block as a new user would paste it (one epoch): it trains, tunes and writes back."""
    code = re.search(r"## Tune your own model.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("epochs=5", "epochs=1").replace("print(tuner.hparams)", "")
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), ns)
    tuner, model = ns["tuner"], ns["model"]
    hp = tuner.hparams
    assert set(hp) == {"lr", "momentum", "weight_decay"}
    assert hp["lr"] != 3e-3 and hp["momentum"] != 0.5  # 16 weight steps, one hyperparameter step moved them
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), tuner.loop.params[k])
    assert len(tuner.history) == 1 and tuner.history[0]["step"] == 16
