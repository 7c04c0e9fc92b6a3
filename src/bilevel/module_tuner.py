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

What the Tuner does to your model and optimiser (each promise is tested, ``tests/test_module_tuner.py``
and ``tests/test_tuner_properties.py``):

* **Tuning off is PyTorch.** ``mode="none"`` (with no ``tune=``) steps your own ``torch.optim`` optimiser on
  the gradient of your loss, batch by batch, exactly like ``opt.zero_grad(); loss.backward(); opt.step()``;
  validation batches are drawn on a random stream of their own, so torch's global RNG (shuffling, dropout)
  sees exactly the draws of the plain loop.
* **Only the optimiser's parameters are trained**; parameters the optimiser does not hold stay as they are.
  Parameter groups keep their own values; ``tune={"lr": "group"}`` tunes one value per group.
* **The optimiser's state is carried over and written back**: a ``torch.optim`` optimiser tuned through its
  differentiable twin starts from its momentum buffers / moments and holds the twin's state (and the tuned
  scalar or per-group values) after :meth:`Tuner.fit`, so a plain loop can continue.
* **Divergence never damages the model**: with ``on_divergence="raise"`` (one model's default) the error names
  what became non-finite first (data, training loss, weights, validation loss, hypergradient) and the step,
  and the model holds the weights (and BatchNorm buffers) from before that step; ``"rollback"`` restores the
  last good state and halves the learning rate (or the hyperparameter step) instead; a population whose every
  member diverged raises (``"record"``, a population's default) or warns (``"warn"``) and leaves the model at
  its initial weights.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from . import functional as Fn
from . import population as pop
from .callbacks import EveryStep
from .cursor import LoaderCursor, isolated_rng
from .errors import NonFiniteError
from .hparams import ZERO_DECAY_START, Granularity, HyperParameter, HyperParameterSpace, for_rule, start_value
from .solvers import AutoNeumann, Solver
from .tuner import OnlineTuner, TunerConfig
from .updates import (
    SGD,
    Adam,
    AdamW,
    RMSprop,
    TorchOptimizer,
    TorchTwin,
    UpdateRule,
    state_from_torch,
    state_to_torch,
    twin,
)

__all__ = ["Tuner", "ModuleLoss", "ZERO_DECAY_START"]

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


class Tuner:
    """Online hyperparameter tuning of an ``nn.Module`` (see the module docstring).

    Args:
        model: the module; after :meth:`fit` it holds the trained weights (of the best member).
        loss_fn: ``loss_fn(model(inputs), target)`` for ``(inputs, target)`` batches; or give
        train_loss, val_loss: callables ``(model, batch) -> scalar`` (``val_loss`` defaults to ``train_loss``).
        optimizer: ``bilevel.optim.SGD(lr=..., momentum=..., weight_decay=...)`` (Adam, AdamW, RMSprop), or a
            ``torch.optim`` optimiser (parameter groups welcome). With a ``torch.optim`` one only the parameters it
            holds are trained.
        tune: names of the hyperparameters to tune, or ``{name: granularity}`` with granularity
            ``"scalar"``, ``"group"`` (one value per parameter group of a ``torch.optim`` optimiser, each starting
            from its group's value), ``"tensor"`` or ``"element"``. Default: the penalty's hyperparameters if a
            penalty is given; with ``mode="none"`` nothing; else the optimiser's lr and those of its momentum and
            weight_decay that are non-zero.
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
        seed: the seed the members' initialisations and sampled hyperparameters are derived from
            (``population > 1`` only).
        device: where to train (default: the model's device).
        progress: draw a progress bar.
        on_divergence: ``"raise"`` (default for one model): the first non-finite value raises
            :class:`bilevel.NonFiniteError` naming it and the step, the model keeping the weights from before it;
            ``"record"`` (default for a population): diverged members are frozen and listed in
            :attr:`divergences`, and a population whose every member diverged raises; ``"warn"``: the same, but
            that last case warns and ends :meth:`fit`; ``"rollback"``: a member whose step goes non-finite is put
            back to its last good state and its learning rate halved (a non-finite hypergradient: its
            hyperparameter steps halved), each event listed in :attr:`divergences`.
        share_gradient: opt-in speed-up: reuse a hyperparameter step's training gradient for the next weight
            step (exact only under the conditions of :class:`bilevel.tuner.SharedGradient`: full-batch training
            with a loss that is a pure function of the weights and the batch).
        autocast: e.g. ``torch.bfloat16``: every forward pass of the training and validation losses (weight
            steps, hypergradients, evaluation) runs under ``torch.autocast(device_type, dtype=autocast)``, so
            matrix products run in that precision; the weights, the hyperparameters, the weight update and the
            hypergradient's linear solve stay in the weights' dtype (float32). Default ``None``: no autocast.
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
        share_gradient: bool = False,
        autocast: torch.dtype | None = None,
        callbacks: Iterable[Any] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._dp = distributed.is_data_parallel()
        if self._dp:  # torchrun: the tuner averages every derivative over the ranks (bilevel.distributed)
            distributed.refuse_fsdp(model)
            if population > 1:
                raise ValueError(
                    "population > 1 is not supported under torch.distributed: train the members data-parallel "
                    "one at a time, or a population on one process"
                )
            model = distributed.unwrap(model)  # DDP's own hooks are bypassed: the collectives do its job
        if train_loss is None and loss_fn is None:
            raise ValueError("pass loss_fn= (e.g. F.cross_entropy) or train_loss=(model, batch) -> scalar")
        if optimizer is None:
            raise ValueError(
                "pass optimizer=, e.g. bilevel.optim.SGD(lr=0.01, momentum=0.9) or a torch.optim optimiser"
            )
        if not (isinstance(population, int) and population >= 1):
            raise ValueError(f"population must be an integer >= 1, got {population!r}")
        divergence = on_divergence or ("raise" if population == 1 else "record")
        if divergence not in ("raise", "record", "warn", "rollback"):
            raise ValueError(f"on_divergence must be 'raise', 'record', 'warn' or 'rollback', got {on_divergence!r}")
        self.on_divergence = divergence
        if autocast is not None and not (isinstance(autocast, torch.dtype) and autocast.is_floating_point):
            raise ValueError(f"autocast must be a floating torch.dtype such as torch.bfloat16, got {autocast!r}")
        self.autocast = autocast
        if device is not None:
            model.to(device)
        trainable = {k: v for k, v in model.named_parameters() if v.requires_grad}
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        torch_opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        named = self._optimised(model, trainable, torch_opt)
        self.model, self.device = model, next(iter(named.values())).device
        self._dtype = next(iter(named.values())).dtype
        self._train = train_loss or _supervised(loss_fn)  # type: ignore[arg-type]
        self._val = val_loss or (_supervised(loss_fn) if loss_fn is not None and train_loss is None else self._train)
        self.penalty = penalty
        penalty_h = {h.name: h for h in (penalty.hyperparameters if penalty is not None else [])}

        # ---- what is tuned, and by which rule
        self._twin: TorchTwin | None = None
        if torch_opt is not None:
            if mode == "none" and tune is None:  # nothing tuned; a penalty still needs its values
                granularity: dict[str, str] = {n: h.granularity.value for n, h in penalty_h.items()}
            else:
                largest = {  # what the default tune= looks at: is a momentum / decay in use in any group
                    n: max(abs(float(g.get(n, 0.0) or 0.0)) for g in torch_opt.param_groups)
                    for n in ("momentum", "weight_decay")
                }
                granularity = self._parse_tune(tune, _rule_names(torch_opt), penalty_h, SimpleNamespace(**largest))
            if any(n not in penalty_h for n in granularity):  # an optimiser hyperparameter: its twin steps
                self._twin = twin(torch_opt, named)
                rule: Any = self._twin.with_defaults()
            else:
                rule = TorchOptimizer(torch_opt, named)
        elif hasattr(optimizer, "hyperparameters") and hasattr(optimizer, "init_state"):
            rule = optimizer
            granularity = (
                {n: h.granularity.value for n, h in penalty_h.items()}
                if mode == "none" and tune is None
                else self._parse_tune(tune, rule.hyperparameters, penalty_h, rule)
            )
        else:
            raise TypeError(
                f"optimizer must be a bilevel.optim rule or a torch.optim optimiser, got {type(optimizer).__name__}"
            )
        unknown = [n for n in granularity if n not in rule.hyperparameters and n not in penalty_h]
        if unknown:
            raise ValueError(
                f"cannot tune {unknown}: {type(optimizer).__name__} has {list(rule.hyperparameters)}"
                + (f", the penalty has {list(penalty_h)}" if penalty_h else "")
            )
        if torch_opt is not None and population > 1:
            raise ValueError("population > 1 needs a bilevel.optim optimiser (a torch.optim one steps one model)")
        self._rule, self._torch_opt = rule, torch_opt
        if penalty is not None:
            self._warn_double_decay(optimizer, granularity)
        specs, init = self._specs(granularity, penalty, penalty_h, list(named))
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
        self._good_buffers = self._buffers
        self._pending: dict[str, Tensor] | None = None
        self._pending_loss: Tensor | None = None
        if share_gradient and self._dp:
            warnings.warn(
                "share_gradient=True under torch.distributed: each rank would decide from its own batch whether to "
                "reuse the gradient, and ranks that disagree would stall in the all-reduce; it is turned off",
                UserWarning,
                stacklevel=2,
            )
            share_gradient = False
        if share_gradient and buffers0:
            warnings.warn(
                "share_gradient=True with a model that has buffers (BatchNorm statistics): the training loss then "
                "depends on state that changes between calls, so sharing is not exact; it is turned off",
                UserWarning,
                stacklevel=2,
            )
            share_gradient = False

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
            implicit=implicit,  # type: ignore[arg-type]
            on_divergence="record" if divergence == "warn" else divergence,  # type: ignore[arg-type]
            share_gradient=share_gradient,
        )
        self.progress = progress
        self._epoch_losses: list[Tensor] = []
        self.loop = OnlineTuner(
            params,
            raw,
            self.space,
            rule,
            distributed.data_parallel_loss(self._train_loss),  # the losses themselves on one process
            distributed.data_parallel_loss(self._val_loss),
            update_form=update_form,
            penalty=self._penalty if penalty is not None else None,
            config=cfg,
            stacked=population > 1,
            callbacks=[EveryStep(self._after_weight_step), *callbacks],
        )
        if self._dp:
            self.loop.any_rank = distributed.any_rank
            distributed.check_replicas({**self.loop.params, **self.loop.raw}, "initial weights and hyperparameters")
        if self._twin is not None:  # the optimiser's momentum buffers / moments carry over
            self.loop.state = state_from_torch(torch_opt, named, rule)  # type: ignore[arg-type]
            self.loop._good = (self.loop.params, self.loop.state)
        self._train_cursor = LoaderCursor("train_loader", isolate_rng=False)
        self._val_cursor = LoaderCursor("val_loader", isolate_rng=True)
        #: one record per epoch: ``{"epoch", "step", "train_loss", "val_loss", "hparams", "events"}`` (best
        #: member's): ``train_loss`` is the mean of the training loss (without penalty) over the epoch's weight
        #: steps, each at the weights before its step; ``val_loss`` is :meth:`evaluate` on the whole
        #: ``val_loader`` after it; ``events`` counts the epoch's divergence events (see :attr:`divergences`)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _optimised(
        model: nn.Module, trainable: Mapping[str, Tensor], torch_opt: torch.optim.Optimizer | None
    ) -> dict[str, Tensor]:
        """The weights to train: the model's trainable parameters that the optimiser holds (all of them for a
        ``bilevel.optim`` rule). Refuses an optimiser holding tensors that are not the model's trainable
        parameters."""
        if torch_opt is None:
            return dict(trainable)
        held = [p for g in torch_opt.param_groups for p in g["params"]]
        ids = {id(p) for p in trainable.values()}
        foreign = [tuple(p.shape) for p in held if id(p) not in ids]
        if foreign:
            frozen = {id(p) for p in model.parameters() if not p.requires_grad}
            why = (
                "some have requires_grad=False"
                if any(id(p) in frozen for p in held)
                else "they are not the model's parameters"
            )
            raise ValueError(
                f"the {type(torch_opt).__name__} optimiser holds tensors of shapes {foreign} that the Tuner cannot "
                f"train ({why}): build it on the model's trainable parameters"
            )
        held_ids = {id(p) for p in held}
        named = {k: v for k, v in trainable.items() if id(v) in held_ids}
        if not named:
            raise ValueError("the optimiser holds none of the model's trainable parameters")
        return named

    def _specs(
        self,
        granularity: Mapping[str, str],
        penalty: Any,
        penalty_h: Mapping[str, HyperParameter],
        names: list[str],
    ) -> tuple[list[HyperParameter], dict[str, Any]]:
        """The hyperparameter specifications and their natural initial values (from the optimiser's groups)."""
        specs: list[HyperParameter] = []
        init: dict[str, Any] = {}
        for name, g in granularity.items():
            if name in penalty_h:
                h = penalty_h[name]
                if g != h.granularity.value:
                    raise ValueError(
                        f"{name!r} is the penalty's own hyperparameter: set its granularity on the penalty"
                    )
                specs.append(h)
                init[name] = start_value(h, float(penalty.initial()[name]), decay=True)
                continue
            groups = self._twin.groups if self._twin is not None else None
            if g == "group":
                if groups is None:
                    raise ValueError(
                        f"tune[{name!r}]='group' needs a torch.optim optimiser (one value per parameter group)"
                    )
                h = for_rule(name, g, groups=groups)
            else:
                h = for_rule(name, g, params=None if g == "scalar" else names)
            specs.append(h)
            decay = name == "weight_decay"
            if self._twin is None:
                init[name] = start_value(h, float(getattr(self._rule, name)), decay=decay)
                continue
            values = self._twin.group_values[name]
            filled = [v for v, grp in zip(values, groups or ()) if grp]
            if g == "scalar" and len(set(filled)) > 1:
                raise ValueError(
                    f"the optimiser's parameter groups differ in {name} ({list(values)}): tune it per group "
                    f"(tune={{{name!r}: 'group'}}) or per tensor ('tensor')"
                )
            starts = [start_value(h, float(v), decay=decay) for v in values]
            if g == "scalar":
                init[name] = starts[0] if not filled else start_value(h, float(filled[0]), decay=decay)
            elif g == "group":
                init[name] = starts
            else:
                init[name] = {k: starts[i] for i, grp in enumerate(groups or ()) for k in grp}
        return specs, init

    def _warn_double_decay(self, optimizer: Any, granularity: Mapping[str, str]) -> None:
        """A penalty on top of an optimiser that decays the weights too: say so (not an error)."""
        if "weight_decay" in granularity:
            return
        if isinstance(optimizer, torch.optim.Optimizer):
            decays = sorted({float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups} - {0.0})
        else:
            decays = [float(getattr(optimizer, "weight_decay", 0.0))] if getattr(optimizer, "weight_decay", 0) else []
        if decays:
            warnings.warn(
                f"the {type(optimizer).__name__} optimiser also decays the weights (weight_decay="
                f"{decays[0] if len(decays) == 1 else decays}); the tuned penalty comes on top of it. Build the "
                "optimiser with weight_decay=0 to have only the penalty",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _parse_tune(
        tune: Any, hyperparameters: Sequence[str], penalty_h: Mapping[str, HyperParameter], rule: Any
    ) -> dict[str, str]:
        if tune is None:
            names = list(penalty_h) or [
                n for n in DEFAULT_TUNED if n in hyperparameters and (n == "lr" or float(getattr(rule, n, 0.0)) != 0.0)
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
                    f"tune[{n!r}]: unknown granularity {g!r}; use 'scalar', 'group', 'tensor' or 'element'"
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

        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            if self.P == 1:
                return one(params, buffers).to(self._dtype) if self.autocast is not None else one(params, buffers)
            out = torch.vmap(one, in_dims=(0, 0), randomness="different")(params, buffers)
            return out.to(self._dtype) if self.autocast is not None else out

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

    def _where(self, mask: Tensor, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``a`` for the members in ``mask`` (shape (P,)), ``b`` for the others."""
        if self.P == 1:
            return dict(a) if bool(mask.reshape(())) else dict(b)
        return {k: torch.where(pop.per_member(mask, v), a[k], v) for k, v in b.items()}

    def _after_weight_step(self, loop: OnlineTuner) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:  # the weight step's BatchNorm statistics become the model's
            if loop.cfg.on_divergence == "rollback" and loop.snapshot is not None:  # as the loop's last good state
                self._good_buffers = self._where(loop.snapshot, self._buffers, self._good_buffers)
                if loop.rolled_back is not None:  # back to the buffers of the state the member returned to
                    pending = self._where(loop.rolled_back, self._good_buffers, pending)
            self._buffers = pending
        if self._pending_loss is not None:  # and its training loss counts towards the epoch's mean
            self._epoch_losses.append(self._pending_loss)
            self._pending_loss = None
        if not loop.sync_free and not bool(loop.alive.any()):
            self._all_diverged()

    def _all_diverged(self) -> None:
        steps = sorted({e["step"] for e in self.divergences if e["action"] == "frozen"})
        msg = (
            f"all {self.P} diverged (at weight steps {steps}); the model is left at its initial weights. Try a "
            "smaller learning rate or hyper_lr, or on_divergence='rollback'"
        )
        what = "values in every member of the population"
        if self.on_divergence == "warn":
            warnings.warn(f"non-finite {what}: {msg}", RuntimeWarning, stacklevel=2)
            raise _StopFit
        raise NonFiniteError(what, msg, step=max(steps, default=None))

    @property
    def rule(self) -> Any:
        """The weight update the loop steps with: a ``bilevel.optim`` rule, the twin of a ``torch.optim``
        optimiser (``bilevel.optim.WithDefaults``), or ``bilevel.optim.TorchOptimizer``."""
        return self.loop.rule if hasattr(self, "loop") else self._rule

    @property
    def divergences(self) -> list[dict[str, Any]]:
        """Every divergence the loop handled, in order: ``{"step", "member", "what", "action"}`` with ``action``
        ``"frozen"`` (the member stops at its initial weights) or ``"rollback"`` (with ``lr_factor``, the
        learning rate's multiplier so far, or ``hyper_factor``, the hyperparameter step's)."""
        return [dict(e) for e in self.loop.history.events]

    # ------------------------------------------------------------------ fitting

    def fit(
        self, train_loader: Iterable[Any], val_loader: Iterable[Any], epochs: int = 1, steps: int | None = None
    ) -> Tuner:
        """Train for ``epochs`` passes over ``train_loader`` (or ``steps`` weight steps), tuning online.

        Both loaders must be re-iterable (a ``DataLoader``, a list of batches): a one-shot iterator (a generator)
        is refused before any step. ``train_loader`` is walked as a plain loop walks it, drawing its shuffling
        from torch's global RNG; ``val_loader`` cycles on a random stream of its own (each hyperparameter step
        takes its next batch), so the global RNG sees exactly the plain loop's draws. Both positions carry over
        to the next :meth:`fit` and into :meth:`state_dict`, so ``fit(epochs=2)`` equals two ``fit(epochs=1)``
        calls, and a run resumed from a checkpoint equals the uninterrupted one. After every epoch the
        validation loss over the whole ``val_loader`` is recorded in :attr:`history`. At the end (also after an
        error) the model holds the trained weights and BatchNorm statistics (the last finite ones), and a
        ``torch.optim`` optimiser the twin's state and the tuned scalar / per-group values.

        Args:
            train_loader: the training batches, re-iterable (one weight step per batch).
            val_loader: the validation batches, re-iterable.
            epochs: the number of passes over ``train_loader`` (>= 1; ignored when ``steps`` is given).
            steps: the number of weight steps to take instead of whole epochs (>= 1), or ``None``.

        Returns:
            This tuner.

        Raises:
            ValueError: for ``epochs`` or ``steps`` that is not an integer >= 1, an empty loader, a
                ``train_loader`` without ``len()`` and no ``steps``, or a one-shot iterator.
            TypeError: when a loader is not iterable.
            NonFiniteError: when every member diverged (unless ``on_divergence="warn"``), or with
                ``on_divergence="raise"`` at the first non-finite value.
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
            if len(val_loader) == 0:  # type: ignore[arg-type]
                raise ValueError("val_loader is empty")
        except TypeError:
            pass
        self._train_cursor.bind(train_loader)
        self._val_cursor.bind(val_loader)
        was_training = self.model.training
        bar = self._progress(sum(chunks))
        try:
            for n in chunks:
                self._epoch_losses = []
                events = len(self.loop.history.events)
                self.loop.run(
                    n,
                    lambda: _to(self._train_cursor.next(), self.device),
                    lambda: _to(self._val_cursor.next(), self.device),
                    progress=(lambda k: bar[0].advance(bar[1], k)) if bar else None,
                )
                if self.loop.sync_free and not bool(self.loop.alive.any()):
                    self._all_diverged()
                if self._dp:
                    self._sync_buffers()
                    distributed.check_replicas({**self.loop.params, **self.loop.raw}, "weights and hyperparameters")
                self._record(val_loader, len(self.loop.history.events) - events)
                if bar:
                    bar[0].update(bar[1], description=self._describe())
        except _StopFit:
            pass
        finally:
            if bar:
                bar[0].stop()
            self._write_back()
            self.model.train(was_training)
        return self

    def _sync_buffers(self) -> None:
        """Data-parallel BatchNorm: each rank normalised with its own batch statistics (as under DDP); the
        running statistics become their mean over the ranks (the same on every rank)."""
        n = distributed.world_size()
        synced = {  # SyncBatchNorm layers (GlobalBatchNorm) keep the same statistics on every rank already
            f"{name}.{b}" if name else b
            for name, m in self.model.named_modules()
            if isinstance(m, distributed.GlobalBatchNorm)
            for b, _ in m.named_buffers(recurse=False)
        }
        for k, v in self._buffers.items():
            if v.is_floating_point() and k not in synced:
                torch.distributed.all_reduce(v)
                v.div_(n)

    def _progress(self, total: int) -> tuple[Any, Any] | None:
        if not self.progress or (self._dp and torch.distributed.get_rank() != 0):
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
        """Mean validation loss over ``loader`` (batches weighted by size), one value per member (shape (P,)).

        The model's train/eval mode is restored afterwards, and torch's global RNG (and the loader's own
        generator) are left as they were: evaluating never changes what training draws next.

        Args:
            loader: the validation batches.

        Returns:
            The mean loss of each member, float64, shape ``(P,)``.

        Raises:
            ValueError: when ``loader`` yields no batches.
        """
        total, count = None, 0
        was_training = self.model.training
        try:
            with isolated_rng(loader):
                for batch in loader:
                    batch = _to(batch, self.device)
                    n = _size(batch)
                    value = self._val_loss(self.loop.params, None, batch).reshape(self.P).double() * n
                    total, count = (value if total is None else total + value), count + n
        finally:
            self.model.train(was_training)
        if total is None:
            raise ValueError("the validation loader yielded no batches")
        if self._dp:  # every rank's shard: the mean over all of them, the same on every rank
            both = torch.cat([total, torch.tensor([float(count)], dtype=total.dtype, device=total.device)])
            torch.distributed.all_reduce(both)
            return both[:-1] / both[-1]
        return total / count

    def _record(self, val_loader: Iterable[Any], events: int) -> None:
        val = self.evaluate(val_loader)
        val = torch.where(self.loop.alive, val, torch.full_like(val, math.inf))
        self._val_last = val
        best = self.best
        train = (
            torch.stack(self._epoch_losses).double().mean(0).reshape(self.P)
            if self._epoch_losses
            else torch.full((self.P,), math.nan, dtype=torch.float64)
        )
        if self._dp:  # the mean over the ranks' shards, as for the validation loss
            torch.distributed.all_reduce(train)
            train = train / distributed.world_size()
        self.history.append(
            {
                "epoch": len(self.history) + 1,
                "step": self.loop.t,
                "train_loss": float(train[best]),
                "val_loss": float(val[best]),
                "hparams": self._means(best),
                "events": events,
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
        val = torch.where(self.loop.alive.to(val.device), val, torch.full_like(val, math.inf))
        return int(torch.argmin(val)) if bool(torch.isfinite(val).any()) else 0

    def _means(self, member: int) -> dict[str, float]:
        return {k: float(v[member]) for k, v in self.loop.describe().items()}

    @property
    def hparams(self) -> dict[str, Any]:
        """The tuned hyperparameters in natural units (of the best member): a float for a scalar one, a list
        of floats (one per parameter group) for a ``"group"`` one, else ``{param_name: tensor}``."""
        with torch.no_grad():
            nat = self.space.natural({k: v.detach() for k, v in self.loop.raw.items()})
        out: dict[str, Any] = {}
        i = self.best
        for name, v in nat.items():
            if isinstance(v, Tensor):
                out[name] = float(v if self.P == 1 else v[i])
            elif self.space[name].granularity is Granularity.GROUP and self._twin is not None:
                out[name] = [float(v[grp[0]]) if grp else math.nan for grp in self._twin.groups]
            else:
                out[name] = {k: (t if self.P == 1 else t[i]).clone() for k, t in v.items()}
        return out

    def _write_back(self) -> None:
        """Copy the (best member's) weights and buffers into the model; the twin's state and the tuned scalar /
        per-group values into a ``torch.optim`` optimiser."""
        i = self.best
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                if k in self.loop.params:
                    p.copy_(self.loop.params[k] if self.P == 1 else self.loop.params[k][i])
            for k, b in self.model.named_buffers():
                if k in self._buffers:
                    b.copy_(self._buffers[k] if self.P == 1 else self._buffers[k][i])
        if self._twin is None or self._torch_opt is None:
            return
        named = dict(self.model.named_parameters())
        state_to_torch(self.loop.state, self._torch_opt, {k: named[k] for k in self.loop.params}, self.rule)
        for name, v in self.hparams.items():
            if name not in self.rule.hyperparameters:
                continue
            if isinstance(v, float):
                values = [v] * len(self._torch_opt.param_groups)
            elif isinstance(v, list):
                values = v
            else:
                continue  # one value per tensor / weight: torch's groups cannot hold it (see Tuner.hparams)
            for g, value in zip(self._torch_opt.param_groups, values):
                if name in ("beta1", "beta2"):
                    b1, b2 = g["betas"]
                    g["betas"] = (value, b2) if name == "beta1" else (b1, value)
                elif name in g and not math.isnan(value):
                    g[name] = value
        if "lr" not in self.space and self.rule is not self._rule:  # rollbacks shrank the untuned learning rate
            lr = getattr(self.rule, "values", {}).get("lr")
            for g, names in zip(self._torch_opt.param_groups, self._twin.groups):
                if names:
                    g["lr"] = float(lr[names[0]]) if isinstance(lr, Mapping) else float(self.rule.lr)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: the loop's state, the module's buffers, the history, the positions in
        both loaders and torch's global random state (which draws a shuffling DataLoader's order and dropout
        masks), so a resumed run continues bit for bit. Holds only tensors, plain containers, numbers and
        strings: it loads with ``torch.load(path, weights_only=True)``."""
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        return {
            "loop": self.loop.state_dict(),
            "buffers": dict(self._buffers),
            "good_buffers": dict(self._good_buffers),
            "history": copy.deepcopy(self.history),
            "train_cursor": self._train_cursor.state_dict(),
            "val_cursor": self._val_cursor.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (in this or a fresh process, with the same construction); the next
        :meth:`fit` picks the loaders up where the saved run left them.

        Args:
            sd: a dictionary from :meth:`state_dict`.
        """
        self.loop.load_state_dict(sd["loop"])
        self._buffers, self.history = dict(sd["buffers"]), copy.deepcopy(list(sd["history"]))
        self._good_buffers = dict(sd.get("good_buffers", self._buffers))
        self._train_cursor.load_state_dict(sd["train_cursor"])
        self._val_cursor.load_state_dict(sd["val_cursor"])
        rng = sd.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


class _StopFit(Exception):
    """Ends :meth:`Tuner.fit` early (every member diverged, ``on_divergence="warn"``)."""


def _rule_names(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The hyperparameter names of a ``torch.optim`` optimiser's twin (those ``tune=`` may name)."""
    twins: dict[type, type[SGD | Adam | RMSprop]] = {
        torch.optim.SGD: SGD,
        torch.optim.Adam: Adam,
        torch.optim.AdamW: AdamW,
        torch.optim.RMSprop: RMSprop,
    }
    rule = twins.get(type(optimizer))
    return rule.hyperparameters if rule is not None else ()
