"""bilevel.integrations.lightning.HyperTuner: online tuning inside a Lightning Trainer (scikit-learn's digits, CPU)."""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason='Lightning is not installed: pip install "bilevel[lightning]"')
pytest.importorskip("sklearn")

import bilevel  # noqa: E402
from bilevel.integrations.lightning import HyperTuner  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models gain nothing from two, and on a shared 2-core machine two thrash."""
    torch.set_num_threads(1)  # conftest's fixture puts the count back afterwards


class EpochShuffle(Sampler[int]):
    """A shuffle drawn from ``seed + epoch`` (Lightning calls ``set_epoch``), so a resumed run draws the same order."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class MLP(pl.LightningModule):
    def __init__(self, lr=3e-3, momentum=0.5, weight_decay=1e-4, groups=False):
        super().__init__()
        self.lr, self.momentum, self.weight_decay, self.groups = lr, momentum, weight_decay, groups
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        params = (
            [{"params": self.net[0].parameters()}, {"params": self.net[2].parameters(), "lr": 2 * self.lr}]
            if self.groups
            else self.parameters()
        )
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return TensorDataset(X[:600], y[:600]), TensorDataset(X[1000:1400], y[1000:1400])


def trainer(**kw):
    cfg = dict(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
    )
    return pl.Trainer(**{**cfg, **kw})


def val_loss(model, dataset):
    x, y = dataset.tensors
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def fit(data, callbacks=(), seed=0, loader=None, model=None, **kw):
    train_set, _ = data
    torch.manual_seed(seed)
    model = model or MLP()
    t = trainer(callbacks=list(callbacks), **kw)
    t.fit(model, loader or DataLoader(train_set, batch_size=64, shuffle=True))
    return model, t


def test_tuned_beats_untuned_from_a_small_learning_rate_and_leaves_the_global_rng_alone(data):
    val_set = data[1]
    fixed, _ = fit(data)
    rng_fixed = torch.get_rng_state()
    cb = HyperTuner(
        DataLoader(val_set, batch_size=200), tune=("lr", "momentum", "weight_decay"), interval=5, hyper_lr=0.2
    )
    tuned, t = fit(data, [cb])
    rng_tuned = torch.get_rng_state()
    assert t.global_step == 3 * 10
    assert cb.hparams["lr"] > 3e-3 * 3  # a learning rate too small for 3 epochs is raised
    assert val_loss(tuned, val_set) < val_loss(fixed, val_set) - 0.02
    # the callback's hypergradients and validation batches draw from streams of their own: Lightning's
    # shuffles (the global RNG) are exactly those of the run without it
    assert torch.equal(rng_fixed, rng_tuned)


def test_first_hyper_step_agrees_with_bilevel_tuner_and_a_finite_difference(data):
    """The first lr step after 10 SGD steps: the same as bilevel.Tuner's on the same weights and batches, and
    in the direction that lowers the validation loss after those 10 steps (central finite difference)."""
    train_set, val_set = data
    train = DataLoader(train_set, batch_size=64, shuffle=False)
    val = DataLoader(val_set, batch_size=200)
    cb = HyperTuner(val, tune=("lr",), interval=10)
    fit(data, [cb], loader=train, max_steps=10)
    lr_callback = cb.hparams["lr"]

    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=3e-3, momentum=0.5, weight_decay=1e-4)
    tuner = bilevel.Tuner(model, loss_fn=F.cross_entropy, optimizer=opt, tune=("lr",), interval=10, progress=False)
    tuner.fit(train, val, steps=10)
    assert lr_callback == pytest.approx(tuner.hparams["lr"], rel=1e-4)

    def val_after_10_steps(lr):  # the plain loop at a fixed lr, validation loss on the first validation batch
        torch.manual_seed(0)
        m = MLP()
        o = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.5, weight_decay=1e-4)
        for _, (x, y) in zip(range(10), train):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        return val_loss(m, TensorDataset(*next(iter(val))))

    eps = 0.05
    fd = (val_after_10_steps(3e-3 * math.exp(eps)) - val_after_10_steps(3e-3 * math.exp(-eps))) / (2 * eps)
    assert fd < 0
    assert lr_callback > 3e-3  # the step descends dL_V/dlog lr


def test_resume_from_a_checkpoint_tunes_exactly_as_the_uninterrupted_run(data, tmp_path):
    train_set, val_set = data

    def loader():
        return DataLoader(train_set, batch_size=64, sampler=EpochShuffle(len(train_set)))

    def callback():
        return HyperTuner(DataLoader(val_set, batch_size=100), tune=("lr", "momentum"), interval=4)

    whole = callback()
    m_whole, _ = fit(data, [whole], loader=loader())

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = callback()
    fit(data, [first, ckpt], loader=loader(), max_epochs=2, enable_checkpointing=True)
    resumed = callback()
    torch.manual_seed(123)  # another initialisation: the checkpoint must bring the weights back
    m_resumed = MLP()
    again = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)  # as in the run that wrote it
    t = trainer(callbacks=[resumed, again], max_epochs=3, enable_checkpointing=True)
    t.fit(m_resumed, loader(), ckpt_path=str(tmp_path / "last.ckpt"))

    assert t.global_step == 30
    assert resumed.hparams == whole.hparams  # bit for bit
    for a, b in zip(m_whole.parameters(), m_resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed.state_dict()["val_cursor"]["taken"] == whole.state_dict()["val_cursor"]["taken"]


def test_values_are_written_into_param_groups_and_logged(data, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    val_set = data[1]
    cb = HyperTuner(DataLoader(val_set, batch_size=200), tune={"lr": "group", "weight_decay": "scalar"}, interval=5)
    _, t = fit(data, [cb], model=MLP(groups=True), logger=CSVLogger(tmp_path), log_every_n_steps=1, max_epochs=2)
    groups = t.optimizers[0].param_groups
    lrs = cb.hparams["lr"]
    assert [g["lr"] for g in groups] == lrs
    assert lrs[0] != 3e-3 and lrs[1] != 6e-3  # both tuned, each in its own group
    assert all(g["weight_decay"] == cb.hparams["weight_decay"] for g in groups)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("hp/lr_group1")]
    assert logged and {"hp/lr_group0", "hp/lr_group1", "hp/weight_decay"} <= set(rows[0])
    assert float(logged[-1]["hp/lr_group1"]) == pytest.approx(lrs[1], rel=1e-6)


def test_a_tuned_penalty_and_refusals(data):
    val_set = data[1]
    torch.manual_seed(0)
    model = MLP(weight_decay=0.0)
    penalty = bilevel.PerWeightDecay(model, init=1e-3, granularity="tensor")
    cb = HyperTuner(DataLoader(val_set, batch_size=200), tune=("lr",), interval=5, penalty=penalty)
    fit(data, [cb], model=model, max_epochs=1)
    assert set(cb.hparams) == {"lr", "l2"} and cb.hparams["l2"] != pytest.approx(1e-3)
    grads = cb.engine.penalty_grads()  # what is added to .grad before each optimiser step: lambda * w
    nat = cb.engine.tuner.natural(cb.engine.tuner.raw)["l2"]
    w = dict(model.named_parameters())["net.0.weight"]
    assert torch.allclose(grads["net.0.weight"], nat["net.0.weight"].detach() * w.detach())

    with pytest.raises(ValueError, match="param_groups hold one value per group"):
        HyperTuner(DataLoader(val_set), tune={"lr": "tensor"})
    with pytest.raises(ValueError, match="re-iterable"):
        HyperTuner(iter(DataLoader(val_set)))
    with pytest.raises(ValueError, match="beta1"):

        class AdamMLP(MLP):
            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=1e-3)

        fit(data, [HyperTuner(DataLoader(val_set), tune=("momentum",))], model=AdamMLP(), max_epochs=1)


def test_example_runs_at_a_tiny_size():
    spec = importlib.util.spec_from_file_location("example_lightning_digits", EXAMPLES / "lightning_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(epochs=4, n_train=320)
    tuned, untuned = out["tuned"], out["untuned"]
    assert untuned["hparams"] == pytest.approx({"lr": 3e-3, "momentum": 0.5, "weight_decay": 1e-4})
    assert tuned["hparams"]["lr"] > 3e-3
    assert tuned["val_loss"] < untuned["val_loss"]
    assert tuned["steps"] == untuned["steps"] == 20


def test_without_lightning_the_module_imports_and_the_callback_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = sys.modules['lightning.pytorch'] = None  # as if not installed\n"
        "import bilevel, bilevel.integrations.lightning as m\n"
        "assert 'lightning' not in [k for k in sys.modules if sys.modules[k] is not None]\n"
        "try:\n    m.HyperTuner([])\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "bilevel[lightning]"' in out
