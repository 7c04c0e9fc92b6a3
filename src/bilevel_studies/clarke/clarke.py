"""Clarke et al. (2022), section 4: one-pass tuning of SGD's learning rate, weight decay and momentum.

Every method starts from the same random initialisations (weights and Table 5
hyperparameters drawn from seed ``S * 1_000_003 + i`` for initialisation i of ``--seed S``,
:func:`bilevel.population.derived_seed`), trained as one vectorised population per method:

=================  ==============================================================
``random``         no HPO; hyperparameters fixed at their initial values
``random-xlr``     ``random`` with lr *= U[0.95, 1.01] every T steps
``random-3batched`` best of every three ``random`` runs by validation loss
``lorraine``       IFT hypergradient on the weight decay only
``baydin``         hypergradient descent on the learning rate, every step, as Clarke et al.'s code
                   (:class:`BaydinAsAuthors`: SGD 0.001 on log10 lr along -g_t . g_{t-1})
``baydin-ours``    our earlier reading: Adam 0.05 on log10 lr through the step just taken
``ours-wd-lr``     IFT on weight decay and learning rate
``ours-wd-lr-m``   IFT on weight decay, learning rate and momentum
``ours-wd-hdlr-m`` as above with one learning rate per weight
``diff-through-opt`` exact hypergradient by unrolling the same i-step window
=================  ==============================================================

The ``random*`` methods train on train+validation merged, as in the paper. UCI
sets are full batch and report test MSE in the original target units (as
Clarke et al.'s Table 1); image sets use batches of 50 and cross-entropy.

Resumable: every method's population is checkpointed every ``checkpoint_every`` steps
(``checkpoints/METHOD.pt``: the whole loop state, batch samplers included) and a finished method is
kept in ``methods/METHOD.json``; re-running the same command continues from there and gives the
same numbers as an uninterrupted run (see "Runs, interruptions and resume" in docs/design.md).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bilevel import data as D
from bilevel import hparams as H
from bilevel import population as pop
from bilevel._io import (
    atomic_save,
    atomic_write_json,
    check_run_config,
    load_torch_state,
    read_json_state,
    save_run_config,
)
from bilevel.callbacks import RandomLRMultiplier
from bilevel.data._split import standardise
from bilevel.nets import mlp_forward, mlp_init
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import SGD

from .. import _common as C

ALL_TUNED = ("lr", "weight_decay", "momentum")


@dataclass(frozen=True)
class Method:
    mode: str = "ift"
    tuned: tuple[str, ...] = ALL_TUNED
    merge_train_val: bool = False
    lr_multiplier: tuple[float, float] | None = None
    per_weight_lr: bool = False
    # Baydin et al.'s hypergradient descent as Clarke et al.'s code runs it (:class:`BaydinAsAuthors`)
    authors_baydin: bool = False


METHODS: dict[str, Method] = {
    "random": Method(mode="none", tuned=(), merge_train_val=True),
    "random-xlr": Method(mode="none", tuned=(), merge_train_val=True, lr_multiplier=(0.95, 1.01)),
    "random-3batched": Method(mode="none", tuned=(), merge_train_val=True),  # derived from "random"
    "lorraine": Method(tuned=("weight_decay",)),
    # Clarke et al.'s Baydin baseline (configs/Baydin.yaml + BaydinHypergradientDescent in their code)
    "baydin": Method(mode="baydin", tuned=("lr",), merge_train_val=True, authors_baydin=True),
    # the earlier "baydin" of this package (Adam 0.05 on log10 lr through the step, training split only)
    "baydin-ours": Method(mode="baydin", tuned=("lr",)),
    "ours-wd-lr": Method(tuned=("lr", "weight_decay")),
    "ours-wd-lr-m": Method(),
    "ours-wd-hdlr-m": Method(per_weight_lr=True),
    "diff-through-opt": Method(mode="unroll"),
}


@dataclass
class ClarkeConfig:
    dataset: str = "energy"
    methods: Sequence[str] = ("random", "ours-wd-lr-m")
    inits: int = 40
    steps: int = 4000
    seed: int = 0
    interval: int = 10
    lookback: int = 5
    hyper_lr: float = 0.05
    baydin_hyper_lr: float = 0.001  # plain SGD step on log10 lr of the authors' Baydin (configs/Baydin.yaml)
    hidden: int = 50
    model: str = "auto"  # mlp (UCI, images), lstm (ptb), resnet18 (cifar10)
    lm_size: str = "cpu"  # ptb: "paper" (2 x 650 units, bptt 70, batch 40) or "cpu" (see LM_SIZES)
    grad_clip: float | None = None  # default 0.25 on ptb, as Clarke et al.
    batch_size: int | None = None  # None: full batch (UCI); 50 for image sets
    val_fraction: float | None = None
    test_fraction: float | None = None  # UCI: share of all rows held out for testing (None: Clarke's split files)
    record_every: int | None = None
    checkpoint_every: int = 500
    record_rows: int = 5000  # train/val/test losses are recorded on at most this many rows of each set
    eval_rows: int | None = None  # final val/test losses on at most this many rows (None: the whole sets)
    outlier_threshold: float | None = None  # final losses above it count as diverged (Clarke: 1e3 on Fashion-MNIST)
    # image inputs: "standardise" (zero mean, unit variance per pixel from the training rows, as the UCI inputs)
    # or "unit" (pixels in [0, 1]); see docs/clarke.md for why standardising matches the paper's baselines
    image_scaling: str = "standardise"
    data_dir: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)


#: configuration keys that may change between a run and its resume: the methods (cached one file each), where
#: the data are read from, the device (as before), and how often a checkpoint is written (it cannot change a result)
RESUME_FREE = ("methods", "device", "data_dir", "checkpoint_every")


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    names = (
        list(METHODS)
        if spec == "all" or spec == ["all"]
        else ([s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec))
    )
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)} or 'all'")
    return names


def space_for(method: Method) -> H.HyperParameterSpace:
    lr = H.learning_rate(granularity="element" if method.per_weight_lr else "scalar")
    return H.HyperParameterSpace([lr, H.weight_decay(), H.momentum()])


# ---------------------------------------------------------------------------- data and losses

#: Penn Treebank LSTM sizes: Clarke et al.'s (sec. 4.2) and a CPU-sized one (10k vocabulary either way).
LM_SIZES = {
    "paper": dict(embed=650, hidden=650, layers=2, bptt=70, batch=40),
    "cpu": dict(embed=64, hidden=128, layers=2, bptt=35, batch=20),
}


@dataclass
class Problem:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    init: Callable[[torch.Generator], dict[str, torch.Tensor]]
    forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    test_scale: float  # multiply test/val loss by this to report it (original target units)
    kind: str
    batches: Callable[[tuple[torch.Tensor, torch.Tensor], int], Any] | None = None  # (data, seed) -> sampler
    seq_len: int | None = None  # language models: examples are columns of bptt tokens

    def merge(self, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
        """Training and validation data as one set (Clarke et al.'s Random methods)."""
        if self.seq_len is None:
            return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
        y = torch.cat([a[1].reshape(self.seq_len, -1), b[1].reshape(self.seq_len, -1)], dim=1)
        return torch.cat([a[0], b[0]], dim=1), y.reshape(-1)

    def chunks(self, data: tuple[torch.Tensor, torch.Tensor], rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``data`` cut into pieces of at most ``rows`` examples (columns of windows for language models)."""
        x, y = data
        if self.seq_len is None:
            return [(x[i : i + rows], y[i : i + rows]) for i in range(0, len(x), rows)]
        cols = max(1, rows // self.seq_len)
        y2 = y.reshape(self.seq_len, -1)
        return [(x[:, i : i + cols], y2[:, i : i + cols].reshape(-1)) for i in range(0, x.shape[1], cols)]


def load_problem(cfg: ClarkeConfig) -> Problem:
    name = D.dataset_name(cfg.dataset)
    info = D.DATASETS[name]
    dtype = getattr(torch, cfg.dtype)
    if info.kind == "language-model":
        return _language_model(cfg, dtype)
    kw: dict[str, Any] = {"data_dir": cfg.data_dir} if name not in ("diabetes", "digits") else {}
    if cfg.val_fraction is not None and info.kind == "regression" and name in D.UCI_DATASETS:
        kw["val_fraction"] = cfg.val_fraction
    if cfg.test_fraction is not None:
        if not (info.kind == "regression" and name in D.UCI_DATASETS):
            raise ValueError(f"--test-fraction applies to the UCI sets, not {name!r} (whose test split is fixed)")
        kw["test_fraction"] = cfg.test_fraction
    if name == "cifar10":
        kw["flatten"] = False
    d = D.load(name, **kw)
    d = d.to(device=cfg.device, dtype=dtype)
    if info.kind == "regression":
        scale = float(d.y_std.reshape(-1)[0]) ** 2 if getattr(d, "y_std", None) is not None else 1.0
        loss = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731
        out_dim = 1
    elif info.kind == "classification":
        scale = 1.0
        loss = F.cross_entropy
        out_dim = d.num_classes
        if cfg.image_scaling == "standardise":
            _, _, (d.X_train, d.X_val, d.X_test) = standardise(d.X_train, d.X_val, d.X_test)
        elif cfg.image_scaling != "unit":
            raise ValueError(f"unknown image_scaling {cfg.image_scaling!r}; use 'standardise' or 'unit'")
    else:
        raise ValueError(f"data set {name!r} is a {info.kind} set, not usable by the clarke experiment")
    model = cfg.model if cfg.model != "auto" else ("resnet18" if name == "cifar10" else "mlp")
    if model == "resnet18":
        from bilevel.nets.resnet import resnet18_forward, resnet18_init

        init = lambda g: resnet18_init(out_dim, g, dtype=dtype)  # noqa: E731
        forward = resnet18_forward
    elif model == "mlp":
        d.X_train, d.X_val, d.X_test = (x.reshape(len(x), -1) for x in (d.X_train, d.X_val, d.X_test))
        sizes = [d.X_train.shape[1], cfg.hidden, out_dim]
        init = lambda g: mlp_init(sizes, g, dtype=dtype)  # noqa: E731
        forward = mlp_forward
    else:
        raise ValueError(f"model {model!r} does not fit data set {name!r}: use mlp or resnet18 (lstm is for ptb)")
    return Problem(
        (d.X_train, d.y_train), (d.X_val, d.y_val), (d.X_test, d.y_test), init, forward, loss, scale, info.kind
    )


def _language_model(cfg: ClarkeConfig, dtype: torch.dtype) -> Problem:
    """Penn Treebank with the LSTM of Clarke et al. sec. 4.2 (``cfg.lm_size``: paper or cpu sizes)."""
    from bilevel.nets.lstm import lstm_lm_forward, lstm_lm_init

    if cfg.lm_size not in LM_SIZES:
        raise ValueError(f"unknown lm_size {cfg.lm_size!r}; known: {list(LM_SIZES)}")
    if cfg.model not in ("auto", "lstm"):
        raise ValueError(f"model {cfg.model!r} does not fit the language-model set {cfg.dataset!r}: use lstm")
    size = LM_SIZES[cfg.lm_size]
    corpus = D.load_ptb(cfg.data_dir)
    vocab = len(corpus.dictionary)
    streams = [
        D.batchify(s, cfg.batch_size or size["batch"]).to(cfg.device) for s in (corpus.train, corpus.valid, corpus.test)
    ]
    bptt = size["bptt"]

    def windows(stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All full bptt windows of a stream side by side: (bptt, n_windows * batch) inputs, flat targets."""
        n = (len(stream) - 1) // bptt
        x = stream[: n * bptt].reshape(n, bptt, -1).permute(1, 0, 2).reshape(bptt, -1)
        y = stream[1 : n * bptt + 1].reshape(n, bptt, -1).permute(1, 0, 2).reshape(-1)
        return x, y

    init = lambda g: lstm_lm_init(vocab, size["embed"], size["hidden"], size["layers"], g, dtype=dtype)  # noqa: E731
    return Problem(
        windows(streams[0]),
        windows(streams[1]),
        windows(streams[2]),
        init,
        lstm_lm_forward,
        F.cross_entropy,
        1.0,
        "language-model",
        batches=lambda data, seed: SequenceBatches(data, bptt, streams[0].shape[1]),
        seq_len=bptt,
    )


class Batches:
    """Full batch, or seeded shuffled mini-batches shared by the whole population."""

    def __init__(self, data: tuple[torch.Tensor, torch.Tensor], batch_size: int | None, seed: int) -> None:
        self.X, self.y = data
        self.bs = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[torch.Tensor] = []

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bs is None or self.bs >= len(self.X):
            return self.X, self.y
        if not self.order:
            perm = torch.randperm(len(self.X), generator=self.gen).to(self.X.device)
            self.order = list(perm.split(self.bs))[: len(self.X) // self.bs][::-1]
        idx = self.order.pop()
        return self.X[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "order": self.order}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.gen.set_state(sd["gen"])
        self.order = list(sd["order"])


class SequenceBatches:
    """Consecutive bptt windows in stream order (one window = ``batch`` columns of the window matrix)."""

    def __init__(self, data: tuple[torch.Tensor, torch.Tensor], bptt: int, batch: int) -> None:
        self.x, self.y = data
        self.y2 = self.y.reshape(bptt, -1)
        self.batch, self.width, self.i = batch, self.x.shape[1], 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        cols = slice(self.i, self.i + self.batch)
        self.i = (self.i + self.batch) % self.width
        return self.x[:, cols], self.y2[:, cols].reshape(-1)

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.i = sd["i"]


# ---------------------------------------------------------------------------- one method


#: the ``variant`` recorded in the results and checkpoints of method ``baydin`` (the authors' Baydin); files of
#: ``baydin`` without it come from the earlier ``baydin`` and are moved to ``baydin-ours`` (:func:`_migrate_baydin`)
AUTHORS_BAYDIN = "authors"


class BaydinAsAuthors(OnlineTuner):
    """Baydin et al.'s (2018) hypergradient descent as Clarke et al.'s code runs it (their *Baydin* baseline).

    From ``configs/Baydin.yaml`` and ``optimisers.BaydinHypergradientDescent`` of
    rmclarke/OptimisingWeightUpdateHyperparameters: after every weight step (``force_single_network_weight_step``)
    the raw hyperparameter ``log10 lr`` (only the learning rate is tuned; momentum and weight decay stay at their
    initial values) receives the gradient

        h = -(dL(w_t; B') . dL(w_{t-1}; B))

    the dot product of the plain loss gradients (no weight decay, no momentum, no gradient clipping) at the weights
    after and before the step, on the step's batch B and on another batch B' drawn by a second sampler over the
    same data (their "validation" loader is the training loader when ``validation_proportion`` is 0, as it is for
    Baydin: it trains on training + validation data, like Random). ``h`` is dL/d lr of plain SGD, applied to
    ``log10 lr`` as it is (no chain-rule factor), by plain SGD with step ``hyper_lr`` (0.001); afterwards the raw
    value is clamped into ``[-10, 0]`` (their ``hyperparameter_clipping: lr: [-10, 0]``, applied in place to
    the raw tensor after each hyperparameter step).

    The library's ``mode="baydin"`` (kept as method ``baydin-ours``) instead differentiates the training loss
    at the new weights through the whole step (momentum buffer and weight decay included) with respect to
    ``log10 lr`` (chain-rule factor ``lr ln 10`` included) and feeds it to Adam 0.05.

    ``next_batches`` is the sampler of B' (``None``: B itself, as for full-batch data, where B' = B).
    """

    #: the raw (log10) learning-rate box of Clarke et al.'s code, applied in place after every step
    RAW_CLIP = (-10.0, 0.0)

    def __init__(self, *args: Any, next_batches: Callable[[], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.next_batches = next_batches

    def _loss_gradients(self, params: Mapping[str, torch.Tensor], nat: Mapping[str, Any], batch: Any):
        w = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            loss = self.train_loss(w, dict(nat), batch).sum()  # members are independent: the stack of their own
            return torch.autograd.grad(loss, list(w.values()))

    def baydin_hypergradient(self, batch: Any, new_batch: Any) -> dict[str, torch.Tensor]:
        """``{key: -(g_new . g_prev)}`` for every tuned raw key, shape of that key (one value per member)."""
        w_prev, _ = self._prev  # type: ignore[misc]
        with torch.no_grad():
            nat = self.natural({k: v.detach() for k, v in self.raw.items()})
        g_prev = self._loss_gradients(w_prev, nat, batch)
        g_new = self._loss_gradients(self.params, nat, new_batch)
        dot = sum((a * b).reshape(self.P, -1).sum(1) for a, b in zip(g_new, g_prev))
        return {k: (-dot).reshape(self.raw[k].shape).to(self.raw[k].dtype) for k in self.tuned_keys}

    def _baydin_step(self, batch: Any) -> None:
        new_batch = self.next_batches() if self.next_batches is not None else batch
        self.apply_hypergradient(self.baydin_hypergradient(batch, new_batch))
        with torch.no_grad():
            for k in self.tuned_keys:
                self.raw[k].clamp_(*self.RAW_CLIP)


def build_tuner(
    cfg: ClarkeConfig,
    problem: Problem,
    method: Method,
    *,
    first: int = 0,
    hparams: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
) -> OnlineTuner:
    """The population of initialisations ``first, ..., first + cfg.inits - 1`` of ``method``.

    Member j's weights and Table 5 hyperparameters come from seed ``derived_seed(cfg.seed, first + j)``
    (``cfg.seed * 1_000_003 + first + j``, :func:`bilevel.population.derived_seed`; see
    :func:`bilevel.population.init_population`), so a block of members equals the same members of
    one big population. ``hparams`` (natural values, one per member, per hyperparameter name of
    the space) replaces the sampled initial hyperparameters: used by ASHA/PBT and Bayesian
    optimisation, which propose them themselves.
    """
    space = space_for(method)
    dtype = getattr(torch, cfg.dtype)
    params, raw = pop.init_population(
        problem.init, cfg.inits, pop.derived_seed(cfg.seed, first), lambda p, g: space.init(p, g, dtype=dtype)
    )
    if hparams is not None:
        raw = natural_population(space, params, hparams, dtype)
    params = {k: v.to(cfg.device) for k, v in params.items()}
    raw = {k: v.to(cfg.device) for k, v in raw.items()}
    train = pop.vmap_loss(problem.forward, problem.loss)
    scale = problem.test_scale
    test = lambda p, h, batch: train(p, h, batch) * scale  # noqa: E731
    tcfg = TunerConfig(
        tuned=method.tuned,
        interval=cfg.interval,
        lookback=cfg.lookback,
        mode="none" if not method.tuned else method.mode,
        hyper_lr=cfg.baydin_hyper_lr if method.authors_baydin else cfg.hyper_lr,
        hyper_optimizer=torch.optim.SGD if method.authors_baydin else torch.optim.Adam,
        record_every=_record_every(cfg),
        seed=cfg.seed,
        grad_clip=cfg.grad_clip if cfg.grad_clip is not None else (0.25 if problem.kind == "language-model" else None),
    )
    callbacks = [RandomLRMultiplier(*method.lr_multiplier, seed=cfg.seed)] if method.lr_multiplier else []
    return (BaydinAsAuthors if method.authors_baydin else OnlineTuner)(
        params,
        raw,
        space,
        SGD(),
        train,
        train,
        update_form=space.names,
        config=tcfg,
        test_loss=test,
        callbacks=callbacks,
    )


def natural_population(
    space: H.HyperParameterSpace,
    params: Mapping[str, torch.Tensor],
    values: Mapping[str, Sequence[float] | torch.Tensor],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Stacked raw hyperparameters of a population from one natural value per member and name."""
    P = pop.size(params)
    lists = {
        n: torch.as_tensor(values[n], dtype=torch.float64).reshape(-1) if n in values else None for n in space.names
    }
    bad = [n for n, v in lists.items() if v is None or v.numel() != P]
    if bad:
        raise ValueError(
            f"initial hyperparameters {bad} need one natural value per member ({P}); "
            f"got { ({n: None if v is None else v.numel() for n, v in lists.items()}) }"
        )
    return pop.stack(
        [
            space.from_natural(pop.member(params, i), {n: lists[n][i] for n in space.names}, dtype=dtype)
            for i in range(P)
        ]
    )


def _record_every(cfg: ClarkeConfig) -> int:
    return cfg.record_every or max(1, cfg.steps // 50)


@dataclass
class MethodRun:
    """One method's population in training: the tuner, its batch samplers and the recording subsets."""

    tuner: OnlineTuner
    train_batches: Any
    val_batches: Any
    record: tuple

    def advance(self, steps: int, progress: Callable[[int], None] | None = None) -> None:
        self.tuner.run(steps, self.train_batches, self.val_batches, record_batches=self.record, progress=progress)

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "tuner": self.tuner.state_dict(),
            "train_batches": self.train_batches.state_dict(),
            "val_batches": self.val_batches.state_dict(),
        }
        if isinstance(self.tuner, BaydinAsAuthors):
            sd["variant"] = AUTHORS_BAYDIN  # tells it from a checkpoint of the earlier "baydin" (now baydin-ours)
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.tuner.load_state_dict(sd["tuner"])
        self.train_batches.load_state_dict(sd["train_batches"])
        self.val_batches.load_state_dict(sd["val_batches"])


def start_method(
    cfg: ClarkeConfig,
    problem: Problem,
    method: str | Method,
    *,
    first: int = 0,
    hparams: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
) -> MethodRun:
    """A fresh :class:`MethodRun` of members ``first ...`` (see :func:`build_tuner`)."""
    method = METHODS[method] if isinstance(method, str) else method
    tuner = build_tuner(cfg, problem, method, first=first, hparams=hparams)
    if method.merge_train_val and len(problem.val[0]):
        train_data = problem.merge(problem.train, problem.val)
    else:
        train_data = problem.train
    sampler = problem.batches or (lambda data, seed: Batches(data, cfg.batch_size, seed))
    record = tuple(problem.chunks(d, cfg.record_rows)[0] for d in (problem.train, problem.val, problem.test))
    # the authors' Baydin draws its second batch B' from a second sampler over its own (merged) training data
    run = MethodRun(
        tuner,
        sampler(train_data, pop.derived_seed(cfg.seed, 0)),
        sampler(train_data if method.authors_baydin else problem.val, pop.derived_seed(cfg.seed, 1)),
        record,
    )
    if isinstance(tuner, BaydinAsAuthors):
        tuner.next_batches = run.val_batches  # its state is checkpointed with the run's
    return run


def run_method(
    cfg: ClarkeConfig,
    problem: Problem,
    name: str,
    ckpt: Path | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    first: int = 0,
) -> dict[str, Any]:
    """Train the population for one method (resuming from ``ckpt`` if it exists); return its results."""
    if cfg.checkpoint_every < 1 or cfg.steps < 1:
        raise ValueError(f"checkpoint_every and steps must be >= 1, got {cfg.checkpoint_every} and {cfg.steps}")
    run = start_method(cfg, problem, name, first=first)
    tuner = run.tuner
    state = load_torch_state(ckpt, f"{name} starts again from step 0") if ckpt is not None else None
    if state is not None:
        run.load_state_dict(state)
        if progress is not None:
            progress(tuner.t)
    while tuner.t < cfg.steps:
        run.advance(min(cfg.checkpoint_every, cfg.steps - tuner.t), progress)
        if ckpt is not None:
            atomic_save(run.state_dict(), ckpt)
    return method_results(cfg, problem, run)


def method_results(cfg: ClarkeConfig, problem: Problem, run: MethodRun) -> dict[str, Any]:
    """Final losses (whole validation/test sets), curves and hyperparameter trajectories of a run."""
    tuner, record = run.tuner, run.record
    h = tuner.history
    if not h.step or h.step[-1] != tuner.t:
        tuner.record(*record)
    # validation and test losses over the whole sets; the training loss on the recorded subset
    finals = {
        name: evaluate(tuner, problem, data, cfg.record_rows) * (problem.test_scale if name != "train" else 1.0)
        for name, data in (
            ("train", record[0]),
            ("val", _head(problem, problem.val, cfg.eval_rows)),
            ("test", _head(problem, problem.test, cfg.eval_rows)),
        )
    }
    cap = cfg.outlier_threshold if cfg.outlier_threshold is not None else math.inf
    ok = [bool(a) and math.isfinite(t) and t <= cap for a, t in zip(tuner.alive.tolist(), finals["test"].tolist())]

    def final(values: torch.Tensor) -> list[float | None]:
        return [float(v) if good else None for v, good in zip(values.tolist(), ok)]

    variant = {"variant": AUTHORS_BAYDIN} if isinstance(tuner, BaydinAsAuthors) else {}
    return {
        **variant,
        "final_test_loss": final(finals["test"]),
        "final_val_loss": final(finals["val"]) if len(problem.val[0]) else [None] * tuner.P,
        "final_train_loss": final(finals["train"]),
        "seconds": [h.seconds / tuner.P] * tuner.P,
        "wall_seconds": h.seconds,
        "diverged_at": h.diverged_at,
        "curves": {"step": h.step, "test_loss": h.test_loss, "val_loss": h.val_loss, "train_loss": h.train_loss},
        "hparams": {"step": h.step, **h.hparams},
    }


def _head(problem: Problem, data: tuple[torch.Tensor, torch.Tensor], rows: int | None):
    return data if rows is None else problem.chunks(data, rows)[0]


def evaluate(tuner: OnlineTuner, problem: Problem, data: tuple[torch.Tensor, torch.Tensor], rows: int) -> torch.Tensor:
    """Per-member mean loss over all of ``data`` (in chunks of ``rows`` examples), shape (P,)."""
    if len(data[0]) == 0:
        return torch.full((tuner.P,), math.nan)
    total, count = torch.zeros(tuner.P, dtype=torch.float64), 0
    with torch.no_grad():
        for x, y in problem.chunks(data, rows):
            n = y.numel()
            total += tuner.train_loss(tuner.params, None, (x, y)).double().cpu() * n
            count += n
    return total / count


def three_batched(random: dict[str, Any]) -> dict[str, Any]:
    """Random (3-batched): of every three consecutive random runs keep the one with the best validation loss.

    ``n // 3`` groups; a remainder of one or two runs forms no group. ``seconds`` of a group is the
    three runs' sum (the compute the paper charges it).
    """
    out: dict[str, list[Any]] = {"final_test_loss": [], "final_val_loss": [], "seconds": []}
    n = len(random["final_test_loss"])
    for i in range(0, n - n % 3, 3):
        group = [
            j
            for j in range(i, i + 3)
            if random["final_val_loss"][j] is not None and random["final_test_loss"][j] is not None
        ]
        best = min(group, key=lambda j: random["final_val_loss"][j]) if group else None
        out["final_test_loss"].append(None if best is None else random["final_test_loss"][best])
        out["final_val_loss"].append(None if best is None else random["final_val_loss"][best])
        out["seconds"].append(sum(random["seconds"][i : i + 3]))
    return out


# ---------------------------------------------------------------------------- the whole experiment


def run(
    cfg: ClarkeConfig,
    out: Path,
    progress_factory=None,
    *,
    backend: str = "local",
    address: str | None = None,
    ray_cpus: int | None = None,
    block_size: int | None = None,
) -> dict[str, Any]:
    """Run every method of ``cfg`` into ``out`` (resumable) and write ``out/results.json``.

    ``backend="ray"`` trains the methods still to do as Ray Tune trials of ``block_size``
    initialisations each (:func:`bilevel_studies.clarke.search.run_clarke`; a local Ray instance with
    ``ray_cpus`` CPUs, or the cluster at ``address``); the results are the same per initialisation
    and land in the same files.
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}: use 'local' or 'ray'")
    out = Path(out)
    methods = validate_config(cfg)
    cfg_dict = asdict(cfg)
    cfg_dict["methods"] = methods
    # a key added since the run started has its default; nothing is written before the data are loaded
    check_run_config(out, cfg_dict, free=RESUME_FREE, defaults=asdict(ClarkeConfig(dataset=cfg.dataset)), save=False)
    problem = load_problem(cfg)
    save_run_config(out, cfg_dict)
    (out / "methods").mkdir(exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    _migrate_baydin(out)
    results: dict[str, Any] = {}
    needed = [m for m in methods if m != "random-3batched"]
    if "random-3batched" in methods and "random" not in needed:
        needed.insert(0, "random")
    if backend == "ray":
        from .search import run_clarke

        todo = [m for m in needed if _finished(out / "methods" / f"{m}.json") is None]
        for name, res in run_clarke(
            cfg, todo, out, address=address, num_cpus=ray_cpus, block_size=block_size, progress_factory=progress_factory
        ).items():
            atomic_write_json(out / "methods" / f"{name}.json", res)
    for name in needed:
        done = out / "methods" / f"{name}.json"
        finished = _finished(done)
        if finished is not None:
            results[name] = finished
            continue
        progress = progress_factory(name, cfg.steps) if progress_factory else None
        res = run_method(cfg, problem, name, out / "checkpoints" / f"{name}.pt", progress)
        atomic_write_json(done, res)
        (out / "checkpoints" / f"{name}.pt").unlink(missing_ok=True)
        results[name] = res
    if "random-3batched" in methods:
        results["random-3batched"] = three_batched(results["random"])
    ordered = {m: results[m] for m in methods if m in results}
    doc = {
        "experiment": "clarke",
        "dataset": D.dataset_name(cfg.dataset),
        "config": cfg_dict,
        "test_loss": "MSE in original target units" if problem.kind == "regression" else "cross-entropy",
        "methods": ordered,
    }
    atomic_write_json(out / "results.json", doc, indent=None, allow_nan=False, default=_nan_to_none)
    return doc


def _migrate_baydin(out: Path) -> None:
    """Files of method ``baydin`` written when ``baydin`` was what is now ``baydin-ours`` become ``baydin-ours``'s.

    ``methods/baydin.json`` / ``checkpoints/baydin.pt`` without ``variant == "authors"`` are renamed to
    ``baydin-ours.json`` / ``baydin-ours.pt`` (same configuration, same code, so the same numbers), unless
    ``baydin-ours`` has its own already (then they are set aside as ``NAME.earlier-baydin``), with a warning.
    """
    import json
    import warnings

    for folder, ext in (("methods", "json"), ("checkpoints", "pt")):
        path = out / folder / f"baydin.{ext}"
        if not path.exists():
            continue
        try:
            doc = json.loads(path.read_text()) if ext == "json" else torch.load(path, weights_only=False)
        except Exception:  # unreadable: left for the usual set-aside of damaged files
            continue
        if not isinstance(doc, dict) or doc.get("variant") == AUTHORS_BAYDIN:
            continue
        target = out / folder / f"baydin-ours.{ext}"
        if target.exists():
            target = path.with_name(path.name + ".earlier-baydin")
        path.replace(target)
        warnings.warn(
            f"{path} was written by the earlier 'baydin' (now method 'baydin-ours'); moved to {target.name}; "
            "'baydin' is now Clarke et al.'s Baydin baseline",
            stacklevel=2,
        )


def _finished(path: Path) -> dict[str, Any] | None:
    """A finished method's results (``methods/NAME.json``), or ``None``: absent, or damaged (then set aside
    with a warning, and the method is trained again from its checkpoint, if any)."""
    return read_json_state(
        path, f"{path.stem} is trained again", check=lambda d: isinstance(d, dict) and "final_test_loss" in d
    )


def validate_config(cfg: ClarkeConfig) -> list[str]:
    """Raise ``ValueError`` naming the first invalid field of ``cfg`` (before anything is written); return
    the parsed method names.

    ``lookback`` is per method: Diff-through-Opt unrolls ``lookback`` steps, so it needs ``>= 1``; the IFT
    methods use ``lookback`` Neumann steps (``lookback + 1`` terms), so 0 is legitimate there (one term,
    the identity approximation); ``random*`` and ``baydin*`` do not use it.
    """
    methods = parse_methods(cfg.methods)
    if not methods:
        raise ValueError("no methods given (--methods)")

    def at_least(name: str, low: int, optional: bool = False) -> None:
        v = getattr(cfg, name)
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")

    for name in ("inits", "steps", "interval", "checkpoint_every", "hidden", "record_rows"):
        at_least(name, 1)
    for name in ("batch_size", "record_every", "eval_rows"):
        at_least(name, 1, optional=True)
    at_least("lookback", 0)
    if cfg.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {cfg.seed}")
    for name in ("hyper_lr", "baydin_hyper_lr"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {v!r}")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(cfg, name)
        if v is not None and not 0 < v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a number in (0, 1), got {v!r}")
    for name in ("grad_clip", "outlier_threshold"):
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {v!r}")
    unrolled = [m for m in methods if METHODS[m].mode == "unroll"]
    if unrolled and cfg.lookback < 1:
        raise ValueError(
            f"--lookback {cfg.lookback}: {', '.join(unrolled)} differentiates through the last "
            "--lookback weight steps, so it needs --lookback >= 1 (0 is fine for the IFT methods: "
            "one Neumann term)"
        )
    if "random-3batched" in methods and cfg.inits < 3:
        raise ValueError(
            f"random-3batched keeps the best of every three random runs: it needs --inits >= 3, got {cfg.inits}"
        )
    return methods


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x).__name__)


# ---------------------------------------------------------------------------- command line

NAME = "clarke"
HELP = "Clarke et al. 2022 sec. 4: random vs one-pass tuned SGD hyperparameters over many initialisations"


def add_arguments(
    p: argparse.ArgumentParser,
    *,
    dataset: str = "energy",
    inits: int = 40,
    steps: int = 4000,
    methods: str = "random,ours-wd-lr-m",
    backend_options: bool = True,
) -> None:
    p.add_argument(
        "--dataset",
        default=dataset,
        help="energy, boston, concrete, kin8nm, naval, power, wine, yacht, fashion-mnist, mnist, diabetes, digits",
    )
    p.add_argument("--methods", default=methods, help=f"comma-separated from {', '.join(METHODS)}, or 'all'")
    p.add_argument(
        "--inits",
        type=C.positive_int,
        default=None,
        help=f"random hyperparameter initialisations per method (default {inits}; --paper-protocol: the paper's)",
    )
    p.add_argument(
        "--steps",
        type=C.positive_int,
        default=None,
        help=f"weight updates (full-batch epochs for UCI; default {steps}; --paper-protocol: the paper's)",
    )
    p.add_argument(
        "--paper-protocol",
        action="store_true",
        help="the paper's scale for the data set where --inits / --steps / --lm-size are not given: UCI 200 x 4000, "
        "fashion-mnist 100 x 8400, ptb 50 x 23910 steps of the 2 x 650 LSTM (Clarke et al. sec. 4; needs a GPU "
        "for ptb)",
    )
    p.set_defaults(clarke_default_inits=inits, clarke_default_steps=steps)
    p.add_argument("--interval", type=C.positive_int, default=10, help="T: weight steps between hyperparameter steps")
    p.add_argument(
        "--lookback",
        type=C.nonnegative_int,
        default=5,
        help="i: Neumann steps of the IFT methods (i + 1 terms; 0 is allowed: one term) / unrolled steps "
        "of diff-through-opt (must be >= 1 there); not used by random* and baydin*",
    )
    p.add_argument("--hyper-lr", type=C.positive_float, default=0.05, help="Adam learning rate on the hyperparameters")
    p.add_argument(
        "--baydin-hyper-lr",
        type=C.positive_float,
        default=0.001,
        help="plain-SGD step on log10 lr of method baydin (Clarke et al.'s Baydin baseline: 0.001); "
        "baydin-ours uses --hyper-lr with Adam",
    )
    p.add_argument(
        "--batch-size",
        type=C.positive_int,
        default=None,
        help="mini-batch size (default: full batch for UCI; "
        "50 for (Fashion-)MNIST, 100 for CIFAR-10, as the paper; the LM size's batch for ptb)",
    )
    p.add_argument("--val-fraction", type=C.fraction, default=None, help="UCI: validation share of train+validation")
    p.add_argument(
        "--test-fraction",
        type=C.fraction,
        default=None,
        help="UCI: share of all rows held out for testing (default: Clarke et al.'s split files, ~10%%)",
    )
    p.add_argument("--hidden", type=C.positive_int, default=50, help="hidden units of the MLP")
    p.add_argument(
        "--model",
        default="auto",
        choices=["auto", "mlp", "resnet18", "lstm"],
        help="auto: mlp (UCI, images), resnet18 (cifar10), lstm (ptb)",
    )
    p.add_argument(
        "--lm-size",
        default=None,
        choices=sorted(LM_SIZES),
        help="ptb LSTM: paper (2 x 650 units, bptt 70, batch 40) or cpu (2 x 128, bptt 35, batch 20; the default "
        "without --paper-protocol)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=C.positive_int,
        default=500,
        help="weight steps between checkpoints: a kill loses at most this much work per method; "
        "re-running the same command resumes and gives the same numbers (it may use another "
        "--checkpoint-every: the interval cannot change a result)",
    )
    p.add_argument(
        "--record-every",
        type=C.positive_int,
        default=None,
        help="weight steps between recorded curve points (default: --steps / 50)",
    )
    p.add_argument(
        "--record-rows",
        type=C.positive_int,
        default=5000,
        help="examples (tokens for ptb) of each set on which the curves are recorded",
    )
    p.add_argument(
        "--eval-rows",
        type=C.positive_int,
        default=None,
        help="final validation and test losses on the first this many examples (tokens for ptb) of each set "
        "(default: the whole sets)",
    )
    p.add_argument(
        "--image-scaling",
        choices=["standardise", "unit"],
        default="standardise",
        help="image inputs: zero mean and unit variance per pixel (training statistics), or pixels in [0, 1]",
    )
    p.add_argument(
        "--outlier-threshold",
        type=C.positive_float,
        default=None,
        help="final test losses above this count as diverged (default: 1e3 for image sets, as Clarke et al.)",
    )
    if backend_options:
        add_backend_arguments(p)


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """``--backend local|ray``, ``--address``, ``--ray-cpus``, ``--block-size``."""
    p.add_argument(
        "--backend",
        default="local",
        choices=["local", "ray"],
        help="local: one vectorised population per method; ray: blocks of initialisations as Ray Tune "
        "trials (pip install 'bilevel[ray]'); re-running resumes via Ray Tune's restore",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (e.g. auto or ray://host:10001); default: start a local Ray instance",
    )
    p.add_argument(
        "--ray-cpus", type=C.positive_int, default=None, help="CPUs of the local Ray instance (default: all)"
    )
    p.add_argument(
        "--block-size",
        type=C.positive_int,
        default=None,
        help="initialisations per Ray trial (default: the population split evenly over the CPUs)",
    )


#: ``--paper-protocol``: Clarke et al.'s initialisations and weight steps per data set (Tables 1 and 2; Fashion-MNIST:
#: 10 epochs of our 42,000-image training split; Penn Treebank: their config's 2391 x 10 steps = 72 epochs of
#: bptt-70 windows of 40 sequences, with the 2 x 650 LSTM)
PAPER_PROTOCOL: dict[str, dict[str, Any]] = {
    **{name: dict(inits=200, steps=4000) for name in D.UCI_DATASETS},
    "fashion-mnist": dict(inits=100, steps=8400),
    "ptb": dict(inits=50, steps=23910, lm_size="paper"),
}


def protocol_settings(a: argparse.Namespace, name: str) -> dict[str, Any]:
    """``inits``, ``steps`` and ``lm_size``: those given on the command line, else the paper's
    (``--paper-protocol``), else the command's defaults."""
    paper = getattr(a, "paper_protocol", False)
    if paper and name not in PAPER_PROTOCOL:
        raise ValueError(
            f"--paper-protocol: no paper protocol for {name!r}; known: {', '.join(sorted(PAPER_PROTOCOL))}"
        )
    table = PAPER_PROTOCOL.get(name, {}) if paper else {}
    fallback = {
        "inits": getattr(a, "clarke_default_inits", 40),
        "steps": getattr(a, "clarke_default_steps", 4000),
        "lm_size": "cpu",
    }
    return {
        key: given if (given := getattr(a, key, None)) is not None else table.get(key, fallback[key])
        for key in ("inits", "steps", "lm_size")
    }


def config_from_args(a: argparse.Namespace) -> ClarkeConfig:
    name = D.dataset_name(a.dataset)
    kind = D.DATASETS[name].kind
    scale = protocol_settings(a, name)
    default_bs = 100 if name == "cifar10" else (50 if kind == "classification" and name != "digits" else None)
    bs = a.batch_size if a.batch_size is not None else default_bs
    return ClarkeConfig(
        dataset=name,
        methods=a.methods,
        inits=scale["inits"],
        steps=scale["steps"],
        seed=a.seed,
        interval=a.interval,
        lookback=a.lookback,
        hyper_lr=a.hyper_lr,
        baydin_hyper_lr=getattr(a, "baydin_hyper_lr", 0.001),
        record_every=getattr(a, "record_every", None),
        record_rows=getattr(a, "record_rows", 5000),
        eval_rows=getattr(a, "eval_rows", None),
        hidden=a.hidden,
        model=getattr(a, "model", "auto"),
        lm_size=scale["lm_size"],
        test_fraction=getattr(a, "test_fraction", None),
        batch_size=bs,
        val_fraction=a.val_fraction,
        checkpoint_every=a.checkpoint_every,
        data_dir=a.data_dir,
        device=a.device,
        dtype=a.dtype,
        image_scaling=a.image_scaling,
        outlier_threshold=a.outlier_threshold
        if a.outlier_threshold is not None
        else (1e3 if D.DATASETS[name].kind == "classification" else None),
    )


def check_arguments(a: argparse.Namespace) -> None:
    """The checks across options (``ValueError``), run by the command line before anything is written."""
    validate_config(config_from_args(a))


def divergence_notes(doc: Mapping[str, Any], hyper_lr_option: str = "--hyper-lr") -> list[str]:
    """One line per method whose every run diverged: when, and what to try."""
    notes = []
    cfg = doc.get("config", {})
    for name, m in doc.get("methods", {}).items():
        finals = m.get("final_test_loss") or []
        if not finals or any(v is not None for v in finals):
            continue
        steps = [s for s in (m.get("diverged_at") or []) if s is not None]
        n = len(finals)
        if steps:
            why = f"non-finite loss by step {max(steps)}"
        elif cfg.get("outlier_threshold") is not None:
            why = f"final test loss above --outlier-threshold {cfg['outlier_threshold']:g} or not finite"
        else:
            why = "non-finite final loss"
        method = METHODS.get(name)
        if method is not None and method.tuned:
            key, option = (
                ("baydin_hyper_lr", "--baydin-hyper-lr") if method.authors_baydin else ("hyper_lr", hyper_lr_option)
            )
            lr = cfg.get(key)
            hint = f"try a smaller {option}" + (f" (now {lr:g})" if isinstance(lr, (int, float)) else "")
        else:
            hint = "these fixed initial hyperparameters do not train (a baseline result, not a fault)"
        notes.append(f"all {n} run{'s' * (n != 1)} of {name} diverged ({why}): {hint}")
    return notes


def perplexity_rows(doc: Mapping[str, Any], n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Table 2's Penn Treebank statistics: per-run test perplexities ``exp(cross-entropy)``, then the usual
    bootstrap mean / median (and best) over them, as :func:`bilevel.report.tables.summary_table`."""
    from bilevel.report.tables import summary_table

    def ppl(v: float | None) -> float | None:
        return None if v is None else math.exp(v)

    perplexities = {
        name: {"final_test_loss": [ppl(v) for v in m.get("final_test_loss") or []]}
        for name, m in doc.get("methods", {}).items()
    }
    return summary_table({"methods": perplexities}, n_resamples=n_resamples, seed=seed)


def write_perplexity_table(doc: Mapping[str, Any], out: Path, console=None) -> Path:
    """Print the perplexity table of a ``ptb`` run and write it to ``out/table_perplexity.md``."""
    from rich.console import Console

    from bilevel._io import atomic_write_text
    from bilevel.report.tables import format_table, markdown_table

    rows = perplexity_rows(doc)
    title = "Final test perplexity (clarke, ptb)"
    (console or Console()).print(format_table(rows, title))
    path = out / "table_perplexity.md"
    atomic_write_text(path, markdown_table(rows, title))
    return path


def main(a: argparse.Namespace, progress_factory=None, console=None) -> dict:
    from bilevel.report import write_report

    doc = run(
        config_from_args(a),
        a.out,
        progress_factory=progress_factory,
        backend=getattr(a, "backend", "local"),
        address=getattr(a, "address", None),
        ray_cpus=getattr(a, "ray_cpus", None),
        block_size=getattr(a, "block_size", None),
    )
    write_report(doc, a.out, console=console)
    if doc["config"].get("dataset") == "ptb":
        write_perplexity_table(doc, Path(a.out), console=console)
    notes = divergence_notes(doc)
    if notes:
        from rich.console import Console
        from rich.markup import escape

        for line in notes:
            (console or Console()).print(f"[yellow]note:[/] {escape(line)}", soft_wrap=True)
    return doc
