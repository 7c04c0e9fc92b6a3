"""A checkpoint taken in one process and resumed in another gives the uninterrupted run, bit for bit.

Three real processes (``sys.executable``): fit(2 epochs); fit(1 epoch) then save ``state_dict`` with
``torch.save``; a fresh process builds the same Tuner, ``torch.load(weights_only=True)``, and fits 1 more epoch.
A dropout MLP, a shuffled training DataLoader without a generator (its order is drawn from torch's global RNG)
and a shuffled validation loader, tuning on (a hyperparameter step every 3 weight steps, one straddling the
epoch boundary).
"""

import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F, bilevel
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    what, path = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(50, 4, generator=g), torch.randint(0, 3, (50,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    train = DataLoader(TensorDataset(X[:40], Y[:40]), batch_size=7, shuffle=True)
    val = DataLoader(TensorDataset(X[40:], Y[40:]), batch_size=4, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tuner = bilevel.Tuner(model, F.cross_entropy, opt, tune=("lr", "momentum"), interval=3, progress=False)
    if what == "whole":
        tuner.fit(train, val, epochs=2)
    elif what == "first":
        tuner.fit(train, val, epochs=1)
        torch.save(tuner.state_dict(), path + ".ckpt")
    else:
        tuner.load_state_dict(torch.load(path + ".ckpt", weights_only=True))
        tuner.fit(train, val, epochs=1)
    if what != "first":
        torch.save({"model": model.state_dict(), "hparams": tuner.hparams, "history": tuner.history}, path)
    """
)


def test_resume_in_a_fresh_process_equals_the_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    for what, out in (("whole", "whole.pt"), ("first", "resumed.pt"), ("second", "resumed.pt")):
        proc = subprocess.run(
            [sys.executable, str(script), what, str(tmp_path / out)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for k, v in whole["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert whole["hparams"] == resumed["hparams"] and whole["hparams"]["lr"] != 0.05
    assert whole["history"] == resumed["history"]
