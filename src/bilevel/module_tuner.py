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

* **Tuning off is PyTorch.** ``strategy="none"`` (with no ``tune=``) steps your own ``torch.optim`` optimiser on
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
from .cursor import LoaderCursor
from .errors import NonFiniteError
from .hparams import ZERO_DECAY_START, HyperParameterSpace
from .loop import Schedule
from .module_bridge import ModuleBridge
from .module_spec import (
    ModuleLoss,
    hyperparameter_specs,
    optimised_weights,
    parse_tune,
    rule_names,
    strategy_and_schedule,
    supervised,
    to_device,
    warn_double_decay,
)
from .strategies import SharedGradient, Strategy
from .tuner import OnlineTuner, TunerConfig
from .updates import TorchOptimizer, TorchTwin, UpdateRule, state_from_torch, twin

__all__ = ["Tuner", "ModuleLoss", "ZERO_DECAY_START"]


class Tuner(ModuleBridge):
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
            penalty is given; with ``strategy="none"`` nothing; else the optimiser's lr and those of its momentum
            and weight_decay that are non-zero.
        penalty: a loss-form penalty such as :class:`bilevel.PerWeightDecay`.
        strategy: *how* a hyperparameter step is computed: ``"ift"`` (default: the IFT with
            :class:`bilevel.solvers.AutoNeumann`, ``lookback`` steps, on the update map when an optimiser
            hyperparameter is tuned, else on the training loss), ``"unroll"`` (Diff-through-Opt), ``"baydin"``,
            ``"none"``, or a :mod:`bilevel.strategies` object (e.g. ``IFT(ConjugateGradient(20))``,
            ``SharedGradient(IFT())``).
        schedule: *when*: T, a hyperparameter step every T weight steps (default 10), or a :mod:`bilevel.loop`
            schedule (e.g. ``Every(10, cold_steps=100)``: Vicol et al.'s cold start).
        lookback: i, the default solver's Neumann steps or the unrolled steps (default 5).
        hyper_lr, hyper_optimizer: the optimiser of the raw hyperparameters (Clarke et al.: Adam, 0.05).
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
        autocast: e.g. ``torch.bfloat16``: every forward pass of the training and validation losses (weight
            steps, hypergradients, evaluation) runs under ``torch.autocast(device_type, dtype=autocast)``, so
            matrix products run in that precision; the weights, the hyperparameters, the weight update and the
            hypergradient's linear solve stay in the weights' dtype (float32). Default ``None``: no autocast.
        callbacks: extra callbacks of the loop (:mod:`bilevel.callbacks`).
        **older: the keywords of earlier versions, still accepted with a ``DeprecationWarning``: ``mode``
            (``strategy``), ``interval`` (``schedule``), ``solver`` and ``implicit`` (``strategy=IFT(...)``),
            ``warm_start`` and ``cold_steps`` (``schedule=Every(T, cold_steps=N)``), ``share_gradient``
            (``strategy=SharedGradient(IFT())``: reuse a hyperparameter step's training gradient, exact only under
            the conditions :class:`bilevel.strategies.SharedGradient` states).
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
        strategy: str | Strategy = "ift",
        schedule: int | Schedule = TunerConfig.interval,  # the defaults are the loop's (bilevel.config.TunerConfig)
        lookback: int = TunerConfig.lookback,
        hyper_lr: float = TunerConfig.hyper_lr,
        hyper_optimizer: Callable[..., torch.optim.Optimizer] = TunerConfig.hyper_optimizer,
        on_divergence: str | None = None,
        grad_clip: float | None = None,
        population: int = 1,
        sample_hparams: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = True,
        autocast: torch.dtype | None = None,
        callbacks: Iterable[Any] = (),
        **older: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._dp = distributed.is_data_parallel()
        self._tied = Fn.tied(model)
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
        named = optimised_weights(model, trainable, torch_opt)
        self.model, self.device = model, next(iter(named.values())).device
        self._dtype = next(iter(named.values())).dtype
        self._train = train_loss or supervised(loss_fn)  # type: ignore[arg-type]
        self._val = val_loss or (supervised(loss_fn) if loss_fn is not None and train_loss is None else self._train)
        self.penalty = penalty
        penalty_h = {h.name: h for h in (penalty.hyperparameters if penalty is not None else [])}

        # ---- what is tuned, and by which rule
        named_strategy = older.get("mode", strategy)
        fixed = tune is None and (named_strategy == "none" or getattr(named_strategy, "tunes", True) is False)
        self._twin: TorchTwin | None = None
        if torch_opt is not None:
            if fixed:
                granularity: dict[str, str] = {n: h.granularity.value for n, h in penalty_h.items()}
            else:
                largest = {  # what the default tune= looks at: is a momentum / decay in use in any group
                    n: max(abs(float(g.get(n, 0.0) or 0.0)) for g in torch_opt.param_groups)
                    for n in ("momentum", "weight_decay")
                }
                granularity = parse_tune(tune, rule_names(torch_opt), penalty_h, SimpleNamespace(**largest))
            if any(n not in penalty_h for n in granularity):  # an optimiser hyperparameter: its twin steps
                self._twin = twin(torch_opt, named)
                rule: Any = self._twin.with_defaults()
            else:
                rule = TorchOptimizer(torch_opt, named)
        elif hasattr(optimizer, "hyperparameters") and hasattr(optimizer, "init_state"):
            rule = optimizer
            granularity = (
                {n: h.granularity.value for n, h in penalty_h.items()}
                if fixed
                else parse_tune(tune, rule.hyperparameters, penalty_h, rule)
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
            warn_double_decay(optimizer, granularity)
        specs, init = hyperparameter_specs(granularity, penalty, penalty_h, list(named), rule, self._twin)
        self.space = HyperParameterSpace(specs)
        update_form = [n for n in granularity if n not in penalty_h]
        how, when = strategy_and_schedule(strategy, schedule, lookback, "update" if update_form else "loss", older)

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
        if isinstance(how, SharedGradient) and (self._dp or buffers0):
            why = (
                "under torch.distributed: each rank would decide from its own batch whether to reuse the gradient, "
                "and ranks that disagree would stall in the all-reduce"
                if self._dp
                else "with a model that has buffers (BatchNorm statistics): the training loss then depends on state "
                "that changes between calls, so sharing is not exact"
            )
            warnings.warn(f"SharedGradient (share_gradient=True) {why}; it is turned off", UserWarning, stacklevel=2)
            how = how.inner

        cfg = TunerConfig(  # the loop's remaining settings (strategy and schedule are passed as they are)
            tuned=tuple(granularity),
            lookback=lookback,
            hyper_lr=hyper_lr,
            hyper_optimizer=hyper_optimizer,
            record_every=10**9,
            grad_clip=grad_clip,
            on_divergence="record" if divergence == "warn" else divergence,  # type: ignore[arg-type]
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
            strategy=how,
            schedule=when,
        )
        if self._dp:
            self.loop.any_rank = distributed.any_rank
            distributed.check_replicas({**self.loop.params, **self.loop.raw}, "initial weights and hyperparameters")
        if self._twin is not None:  # the optimiser's momentum buffers / moments carry over
            self.loop.state = state_from_torch(torch_opt, named, rule)  # type: ignore[arg-type]
            self.loop.reset_good_state()
        self._train_cursor = LoaderCursor("train_loader", isolate_rng=False)
        self._val_cursor = LoaderCursor("val_loader", isolate_rng=True)
        #: one record per epoch: ``{"epoch", "step", "train_loss", "val_loss", "hparams", "events"}`` (best
        #: member's): ``train_loss`` is the mean of the training loss (without penalty) over the epoch's weight
        #: steps, each at the weights before its step; ``val_loss`` is :meth:`evaluate` on the whole
        #: ``val_loader`` after it; ``events`` counts the epoch's divergence events (see :attr:`divergences`)
        self.history: list[dict[str, Any]] = []

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
                    lambda: to_device(self._train_cursor.next(), self.device),
                    lambda: to_device(self._val_cursor.next(), self.device),
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
