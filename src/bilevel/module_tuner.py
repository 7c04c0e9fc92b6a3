"""The front door: tune the hyperparameters of your own ``nn.Module``'s training online, with your DataLoaders.

::

    tuner = bilevel.Tuner(model, loss_fn=F.cross_entropy,
                          optimizer=bilevel.optim.SGD(lr=3e-3, momentum=0.5, weight_decay=1e-4),
                          tune=("lr", "momentum", "weight_decay"))
    tuner.fit(train_loader, val_loader, epochs=5)
    print(tuner.hparams)          # natural units; the model now holds the trained weights

:class:`Tuner` builds the one online loop (:class:`bilevel.tuner.OnlineTuner`, Algorithm 1 of
Lorraine et al. 2020 / Clarke et al. 2022) around a module: its trainable parameters become the
weights ``w``, the tuned hyperparameters ``lambda`` live in raw (log10 / logit) space, every T
weight steps one hypergradient step moves them. Two kinds of hyperparameters:

* *update-form*: those of a differentiable optimiser (``bilevel.optim.SGD/Adam/AdamW/RMSprop``, or a
  ``torch.optim`` one of these four, converted to its parity-tested twin), tuned by the IFT on
  the update map (Clarke et al. 2022, eq. 4-7), scalar or one per tensor / weight
  (``tune={"lr": "element"}``);
* *loss-form*: a penalty such as :class:`bilevel.PerWeightDecay` (``penalty=``), tuned by the IFT on
  the penalised training loss's stationarity (Lorraine et al. 2020, eq. 2-3), while **any**
  ``torch.optim`` optimiser steps the weights.

The training loss runs the module in train mode (BatchNorm statistics are updated once per weight
step, never by hypergradient evaluations), the validation loss in eval mode. ``population=N`` trains
N initialisations at once (``vmap``), keeping the best by validation loss.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as Fn
from . import population as pop
from .callbacks import EveryStep
from .hparams import Granularity, HyperParameter, HyperParameterSpace, for_rule
from .solvers import AutoNeumann, Solver
from .tuner import OnlineTuner, TunerConfig
from .updates import TorchOptimizer, UpdateRule, from_torch

__all__ = ["Tuner", "ModuleLoss"]

#: ``loss(model, batch) -> scalar``: any function of the module (called as ``model(x)``) and a batch
ModuleLoss = Callable[[nn.Module, Any], Tensor]
DEFAULT_TUNED = ("lr", "momentum", "weight_decay")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _supervised(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> ModuleLoss:
    """``loss_fn(model(*inputs), target)`` for a batch ``(inputs..., target)``."""

    def loss(model: nn.Module, batch: Any) -> Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(
                "with loss_fn=, each batch must be (inputs, target); pass train_loss=/val_loss= "
                "callables (model, batch) -> scalar for other batches"
            )
        return loss_fn(model(*batch[:-1]), batch[-1])

    return loss


def _size(batch: Any) -> int:
    first = (
        batch[0]
        if isinstance(batch, (list, tuple))
        else next(iter(batch.values()))
        if isinstance(batch, Mapping)
        else batch
    )
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else 1


def _edge_checked(h: HyperParameter, value: float) -> float:
    """``value`` if the transform can move it, else a value just inside the domain, with a warning."""
    lo, hi = h.transform.domain
    if not math.isfinite(value):
        raise ValueError(f"initial {h.name}={value} is not finite")
    bounded = math.isfinite(lo) and math.isfinite(hi)
    margin = 1e-2 * (hi - lo) if bounded else 1e-6
    moved = lo + margin if value <= lo else hi - margin if value >= hi else value
    if h.clip is not None and not h.clip[0] <= moved <= h.clip[1]:
        raise ValueError(f"initial {h.name}={value} lies outside its range {h.clip}")
    if moved != value:
        if h.name == "lr":
            raise ValueError(f"initial lr={value}: a learning rate must be > 0 to be tuned")
        warnings.warn(
            f"initial {h.name}={value} lies on the edge of its {h.transform.name} domain {h.transform.domain}, "
            f"where a tuned value cannot move; starting it at {moved:g} instead",
            UserWarning,
            stacklevel=4,
        )
    return moved


class Tuner:
    """Online hyperparameter tuning of an ``nn.Module`` (see the module docstring).

    Args:
        model: the module; after :meth:`fit` it holds the trained weights (of the best member).
        loss_fn: ``loss_fn(model(inputs), target)`` for ``(inputs, target)`` batches; or give
        train_loss, val_loss: callables ``(model, batch) -> scalar`` (``val_loss`` defaults to ``train_loss``).
        optimizer: ``bilevel.optim.SGD(lr=..., momentum=..., weight_decay=...)`` (Adam, AdamW, RMSprop), or a
            ``torch.optim`` optimiser built on ``model.parameters()``.
        tune: names of the hyperparameters to tune, or ``{name: granularity}`` with granularity
            ``"scalar"``, ``"tensor"`` or ``"element"``. Default: the penalty's hyperparameters if a
            penalty is given, else the optimiser's lr and those of its momentum and weight_decay that are
            non-zero (a value of 0 lies on the edge of its domain: name it in ``tune`` to tune it from just inside).
        penalty: a loss-form penalty such as :class:`bilevel.PerWeightDecay`.
        interval, lookback: T weight steps per hyperparameter step; Neumann steps / unrolled steps (i).
        mode: ``"ift"``, ``"unroll"`` (Diff-through-Opt), ``"baydin"`` or ``"none"``.
        solver: the IFT solver; default :class:`bilevel.solvers.AutoNeumann` (``lookback`` steps, alpha by power
            iteration, refreshed when the series grows).
        implicit: ``"update"`` (IFT on the update map) or ``"loss"`` (on the training loss); default ``"update"``
            when an optimiser hyperparameter is tuned, else ``"loss"``.
        hyper_lr, hyper_optimizer: the optimiser of the raw hyperparameters (Clarke et al.: Adam, 0.05).
        warm_start, cold_steps: Vicol et al.'s warm start (default) or cold start.
        grad_clip: clip the training gradient's norm.
        population: train this many initialisations at once; member 0 starts from the model's weights,
            the others from ``reset_parameters()`` under seeds ``population.derived_seed(seed, i)``
            (different ``seed`` values give disjoint populations).
        sample_hparams: start each member's hyperparameters from Clarke et al. Table 5 ranges instead of the
            optimiser's values.
        device: where to train (default: the model's device).
        progress: draw a progress bar.
        on_divergence: ``"raise"`` (default for one model) or ``"record"`` (default for a population).
        callbacks: extra callbacks of the loop (:mod:`bilevel.callbacks`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        optimizer: UpdateRule | torch.optim.Optimizer | None = None,
        tune: str | Sequence[str] | Mapping[str, str] | None = None,
        *,
        penalty: Any = None,
        train_loss: ModuleLoss | None = None,
        val_loss: ModuleLoss | None = None,
        interval: int = 10,
        lookback: int = 5,
        mode: str = "ift",
        solver: Solver | None = None,
        implicit: str | None = None,
        hyper_lr: float = 0.05,
        hyper_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        warm_start: bool = True,
        cold_steps: int = 100,
        grad_clip: float | None = None,
        population: int = 1,
        sample_hparams: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = True,
        on_divergence: str | None = None,
        callbacks: Iterable[Any] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if train_loss is None and loss_fn is None:
            raise ValueError("pass loss_fn= (e.g. F.cross_entropy) or train_loss=(model, batch) -> scalar")
        if optimizer is None:
            raise ValueError(
                "pass optimizer=, e.g. bilevel.optim.SGD(lr=0.01, momentum=0.9) or a torch.optim optimiser"
            )
        if not (isinstance(population, int) and population >= 1):
            raise ValueError(f"population must be an integer >= 1, got {population!r}")
        if device is not None:
            model.to(device)
        named = {k: v for k, v in model.named_parameters() if v.requires_grad}
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.model, self.device = model, next(iter(named.values())).device
        self._train = train_loss or _supervised(loss_fn)  # type: ignore[arg-type]
        self._val = val_loss or (_supervised(loss_fn) if loss_fn is not None and train_loss is None else self._train)
        self.penalty = penalty
        penalty_h = {h.name: h for h in (penalty.hyperparameters if penalty is not None else [])}

        # ---- what is tuned, and by which rule
        torch_opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        probe = (
            from_torch(torch_opt) if torch_opt is not None and not self._only_penalty(tune, penalty_h) else optimizer
        )
        if isinstance(probe, torch.optim.Optimizer):
            rule: Any = TorchOptimizer(probe, named)
        elif hasattr(probe, "hyperparameters") and hasattr(probe, "init_state"):
            rule = probe
        else:
            raise TypeError(
                f"optimizer must be a bilevel.optim rule or a torch.optim optimiser, got {type(optimizer).__name__}"
            )
        granularity = self._parse_tune(tune, rule, penalty_h)
        unknown = [n for n in granularity if n not in rule.hyperparameters and n not in penalty_h]
        if unknown:
            raise ValueError(
                f"cannot tune {unknown}: {type(rule).__name__} has {list(rule.hyperparameters)}"
                + (f", the penalty has {list(penalty_h)}" if penalty_h else "")
            )
        if isinstance(rule, TorchOptimizer) and population > 1:
            raise ValueError("population > 1 needs a bilevel.optim optimiser (a torch.optim one steps one model)")
        self.rule, self._torch_opt = rule, torch_opt if not isinstance(rule, TorchOptimizer) else None
        names = list(named)
        specs, init = [], {}
        for name, g in granularity.items():
            if name in penalty_h:
                h = penalty_h[name]
                if g != h.granularity.value:
                    raise ValueError(
                        f"{name!r} is the penalty's own hyperparameter: set its granularity on the penalty"
                    )
                specs.append(h)
                init[name] = _edge_checked(h, float(penalty.initial()[name]))
            else:
                h = for_rule(name, g, params=None if g == "scalar" else names)
                specs.append(h)
                init[name] = _edge_checked(h, float(getattr(rule, name)))
        self.space = HyperParameterSpace(specs)
        update_form = [n for n in granularity if n not in penalty_h]
        implicit = implicit or ("update" if update_form else "loss")

        # ---- members
        self.P = population
        params0 = {k: v.detach().clone() for k, v in named.items()}
        raw0 = self.space.from_natural(params0, init)
        buffers0 = {k: v.detach().clone() for k, v in model.named_buffers()}
        if population == 1:
            params, raw, self._buffers = params0, raw0, buffers0
        else:
            members = [params0] + [self._reinitialised(pop.derived_seed(seed, i)) for i in range(1, population)]
            params = pop.stack(members)
            raws = [
                self.space.init(params0, torch.Generator().manual_seed(pop.derived_seed(seed, i)))
                if sample_hparams
                else raw0
                for i in range(population)
            ]
            raw = pop.stack(raws)
            self._buffers = {k: torch.stack([v] * population) for k, v in buffers0.items()}
        self._pending: dict[str, Tensor] | None = None
        self._pending_loss: Tensor | None = None
        self._val_taken = 0  # validation batches taken by hyperparameter steps (the cycle continues across fits)

        cfg = TunerConfig(
            tuned=tuple(granularity),
            interval=interval,
            lookback=lookback,
            mode=mode,  # type: ignore[arg-type]
            solver=solver or AutoNeumann(lookback, max_alpha=1.0 if implicit == "update" else None),
            hyper_lr=hyper_lr,
            hyper_optimizer=hyper_optimizer,
            warm_start=warm_start,
            cold_steps=cold_steps,
            record_every=10**9,
            grad_clip=grad_clip,
            seed=seed,
            implicit=implicit,  # type: ignore[arg-type]
            on_divergence=on_divergence or ("raise" if population == 1 else "record"),  # type: ignore[arg-type]
        )
        self.progress = progress
        self._epoch_losses: list[Tensor] = []
        self.loop = OnlineTuner(
            params,
            raw,
            self.space,
            rule,
            self._train_loss,
            self._val_loss,
            update_form=update_form,
            penalty=self._penalty if penalty is not None else None,
            config=cfg,
            stacked=population > 1,
            callbacks=[EveryStep(self._after_weight_step), *callbacks],
        )
        #: one record per epoch: ``{"epoch", "step", "train_loss", "val_loss", "hparams"}`` (best member's):
        #: ``train_loss`` is the mean of the training loss (without penalty) over the epoch's weight steps, each
        #: at the weights before its step; ``val_loss`` is :meth:`evaluate` on the whole ``val_loader`` after it
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _only_penalty(tune: Any, penalty_h: Mapping[str, HyperParameter]) -> bool:
        if tune is None:
            return bool(penalty_h)
        names = [tune] if isinstance(tune, str) else list(tune)
        return all(n in penalty_h for n in names)

    @staticmethod
    def _parse_tune(tune: Any, rule: Any, penalty_h: Mapping[str, HyperParameter]) -> dict[str, str]:
        if tune is None:
            names = list(penalty_h) or [
                n
                for n in DEFAULT_TUNED
                if n in rule.hyperparameters and (n == "lr" or float(getattr(rule, n, 0.0)) != 0.0)
            ]
            if not names:
                raise ValueError("nothing to tune: pass tune=(...) or a penalty")
            return {n: penalty_h[n].granularity.value if n in penalty_h else "scalar" for n in names}
        if isinstance(tune, str):
            tune = (tune,)
        items = (
            tune.items()
            if isinstance(tune, Mapping)
            else [(n, penalty_h[n].granularity.value if n in penalty_h else "scalar") for n in tune]
        )
        out = {}
        for n, g in items:
            try:
                out[n] = Granularity(g).value
            except ValueError:
                raise ValueError(
                    f"tune[{n!r}]: unknown granularity {g!r}; use 'scalar', 'tensor' or 'element'"
                ) from None
        if not out:
            raise ValueError("tune is empty: name at least one hyperparameter")
        return out

    def _reinitialised(self, seed: int) -> dict[str, Tensor]:
        """The model's parameters after ``reset_parameters()`` of every submodule under ``seed``."""
        clone = copy.deepcopy(self.model)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for m in clone.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()  # type: ignore[operator]
        return {k: v.detach().clone() for k, v in clone.named_parameters() if v.requires_grad}

    # ------------------------------------------------------------------ the losses, as functions of the weights

    def _evaluate(
        self, fn: ModuleLoss, params: Mapping[str, Tensor], batch: Any, buffers: Mapping[str, Tensor], train: bool
    ) -> Tensor:
        self.model.train(train)

        def one(p: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
            value = Fn.call(self.model, p, fn, batch, buffers=b)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    "the training/validation loss must return a scalar tensor, got "
                    f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
                )
            return value.reshape(())

        if self.P == 1:
            return one(params, buffers)
        return torch.vmap(one, in_dims=(0, 0), randomness="different")(params, buffers)

    def _train_loss(self, params: Mapping[str, Tensor], nat: Any, batch: Any) -> Tensor:
        buffers = {k: v.clone() for k, v in self._buffers.items()}
        value = self._evaluate(self._train, params, batch, buffers, train=True)
        self._pending, self._pending_loss = buffers, value.detach()
        return value

    def _val_loss(self, params: Mapping[str, Tensor], nat: Any, batch: Any) -> Tensor:
        return self._evaluate(self._val, params, batch, self._buffers, train=False)

    def _penalty(self, params: Mapping[str, Tensor], nat: Any) -> Tensor:
        if self.P == 1:
            return self.penalty(params, nat)
        return torch.vmap(self.penalty)(params, nat)

    def _after_weight_step(self, loop: OnlineTuner) -> None:
        if self._pending is not None:  # the weight step's BatchNorm statistics become the model's
            self._buffers, self._pending = self._pending, None
        if self._pending_loss is not None:  # and its training loss counts towards the epoch's mean
            self._epoch_losses.append(self._pending_loss)
            self._pending_loss = None

    # ------------------------------------------------------------------ fitting

    def _batches(self, loader: Iterable[Any], name: str, skip: int = 0, count: bool = False) -> Iterator[Any]:
        while True:
            empty = True
            for batch in loader:
                empty = False
                if skip:
                    skip -= 1
                    continue
                if count:
                    self._val_taken += 1
                yield _to(batch, self.device)
            if empty:
                raise ValueError(f"{name} yielded no batches")

    def fit(
        self, train_loader: Iterable[Any], val_loader: Iterable[Any], epochs: int = 1, steps: int | None = None
    ) -> Tuner:
        """Train for ``epochs`` passes over ``train_loader`` (or ``steps`` weight steps), tuning online.

        ``val_loader`` (any iterable of batches) cycles: each hyperparameter step takes its next batch,
        continuing the cycle where the previous :meth:`fit` (or the loaded :meth:`state_dict`) left it
        (for a loader with ``len()``), so ``fit(epochs=2)`` equals two ``fit(epochs=1)`` calls.
        After every epoch the validation loss over the whole ``val_loader`` is recorded in
        :attr:`history`. At the end the model holds the trained weights (and BatchNorm statistics).
        """
        if steps is None:
            if not (isinstance(epochs, int) and epochs >= 1):
                raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
            try:
                per_epoch = len(train_loader)  # type: ignore[arg-type]
            except TypeError:
                raise ValueError("train_loader has no len(): pass steps= (weight steps to take)") from None
            if per_epoch < 1:
                raise ValueError("train_loader is empty")
            chunks = [per_epoch] * epochs
        else:
            if not (isinstance(steps, int) and steps >= 1):
                raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
            chunks = [steps]
        try:
            n_val = len(val_loader)  # type: ignore[arg-type]
        except TypeError:
            n_val = None
        if n_val == 0:
            raise ValueError("val_loader is empty")
        skip = self._val_taken % n_val if n_val else 0
        train_it = self._batches(train_loader, "train_loader")
        val_it = self._batches(val_loader, "val_loader", skip=skip, count=True)
        was_training = self.model.training
        bar = self._progress(sum(chunks))
        try:
            for n in chunks:
                self._epoch_losses = []
                self.loop.run(
                    n,
                    lambda: next(train_it),
                    lambda: next(val_it),
                    progress=(lambda k: bar[0].advance(bar[1], k)) if bar else None,
                )
                self._record(val_loader)
                if bar:
                    bar[0].update(bar[1], description=self._describe())
        finally:
            if bar:
                bar[0].stop()
            self._write_back()
            self.model.train(was_training)
        return self

    def _progress(self, total: int) -> tuple[Any, Any] | None:
        if not self.progress:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
        )
        bar.start()
        return bar, bar.add_task("tuning", total=total)

    def _describe(self) -> str:
        last = self.history[-1]
        hp = ", ".join(f"{k} {v:.3g}" for k, v in last["hparams"].items())
        return f"val {last['val_loss']:.4g} | {hp}"

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any]) -> Tensor:
        """Mean validation loss over ``loader`` (batches weighted by size), one value per member (shape (P,))."""
        total, count = None, 0
        for batch in loader:
            batch = _to(batch, self.device)
            n = _size(batch)
            value = self._val_loss(self.loop.params, None, batch).reshape(self.P).double() * n
            total, count = (value if total is None else total + value), count + n
        if total is None:
            raise ValueError("the validation loader yielded no batches")
        return total / count

    def _record(self, val_loader: Iterable[Any]) -> None:
        val = self.evaluate(val_loader)
        val = torch.where(self.loop.alive, val, torch.full_like(val, math.inf))
        self._val_last = val
        best = self.best
        train = torch.stack(self._epoch_losses).double().mean(0).reshape(self.P)
        self.history.append(
            {
                "epoch": len(self.history) + 1,
                "step": self.loop.t,
                "train_loss": float(train[best]),
                "val_loss": float(val[best]),
                "hparams": self._means(best),
            }
        )
        for cb in self.loop.callbacks:  # e.g. bilevel.callbacks.TensorBoardLogger: per-epoch curves of every member
            if hasattr(cb, "on_epoch"):
                cb.on_epoch(self.loop, {"train": train, "val": val})

    # ------------------------------------------------------------------ results

    @property
    def best(self) -> int:
        """Index of the member with the lowest validation loss at the last record (0 before any)."""
        val = getattr(self, "_val_last", None)
        if val is None or self.P == 1:
            return 0
        return int(torch.argmin(val))

    def _means(self, member: int) -> dict[str, float]:
        return {k: float(v[member]) for k, v in self.loop.describe().items()}

    @property
    def hparams(self) -> dict[str, Any]:
        """The tuned hyperparameters in natural units (of the best member): a float for a scalar one, else
        ``{param_name: tensor}``."""
        with torch.no_grad():
            nat = self.space.natural({k: v.detach() for k, v in self.loop.raw.items()})
        out: dict[str, Any] = {}
        i = self.best
        for name, v in nat.items():
            if isinstance(v, Tensor):
                out[name] = float(v if self.P == 1 else v[i])
            else:
                out[name] = {k: (t if self.P == 1 else t[i]).clone() for k, t in v.items()}
        return out

    def _write_back(self) -> None:
        """Copy the (best member's) weights and buffers into the model; scalar tuned values into a torch.optim."""
        i = self.best
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                if k in self.loop.params:
                    p.copy_(self.loop.params[k] if self.P == 1 else self.loop.params[k][i])
            for k, b in self.model.named_buffers():
                if k in self._buffers:
                    b.copy_(self._buffers[k] if self.P == 1 else self._buffers[k][i])
        if self._torch_opt is not None:
            for name, v in self.hparams.items():
                if isinstance(v, float):
                    for g in self._torch_opt.param_groups:
                        if name in g:
                            g[name] = v

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: the loop's state, the module's buffers, the history, the position
        in the validation cycle and torch's global random state (which draws a shuffling DataLoader's order and
        dropout masks), so a run resumed between epochs continues bit for bit."""
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        return {
            "loop": self.loop.state_dict(),
            "buffers": self._buffers,
            "history": self.history,
            "val_taken": self._val_taken,
            "rng": rng,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.loop.load_state_dict(sd["loop"])
        self._buffers, self.history = dict(sd["buffers"]), list(sd["history"])
        self._val_taken = int(sd.get("val_taken", 0))
        rng = sd.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
