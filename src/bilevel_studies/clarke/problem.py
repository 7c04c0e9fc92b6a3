"""The ``clarke`` experiment's problems: data, model and loss of each data set, and the batch samplers.

UCI sets are full batch and report test MSE in the original target units (as Clarke et al.'s Table 1);
image sets use batches of 50 and cross-entropy; Penn Treebank trains Clarke et al.'s LSTM (sec. 4.2) on
consecutive bptt windows. The samplers' states are plain (tensors and numbers), so they go into a
checkpoint as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bilevel import data as D
from bilevel.data import standardise
from bilevel.nets import mlp_forward, mlp_init

from .config import ClarkeConfig

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
