"""Online hyperparameter tuning inside a PyTorch Lightning ``Trainer``: the :class:`HyperTuner` callback.

::

    from bilevel.integrations.lightning import HyperTuner

    tuner = HyperTuner(val_loader, tune=("lr", "momentum", "weight_decay"), interval=10)
    trainer = lightning.Trainer(max_epochs=3, callbacks=[tuner])
    trainer.fit(model, train_loader)          # model.configure_optimizers() returns e.g. torch.optim.SGD
    print(tuner.hparams)                      # the tuned values, also in optimizer.param_groups and the logs

Lightning keeps its loop: it draws the training batches, runs ``training_step``, ``backward`` and the
optimiser step. Every ``interval`` optimiser steps the callback takes one hyperparameter step (Algorithm 1
of Lorraine et al. 2020 / Clarke et al. 2022): the IFT hypergradient of the validation loss through the
update map of the optimiser's differentiable twin, Clarke et al. (2022) eq. 4-7,

.. math::

    \\frac{dL_V}{d\\lambda} \\approx \\frac{\\partial L_V}{\\partial \\lambda}
        - \\frac{\\partial L_V}{\\partial w} \\sum_{j=0}^{i} \\Big(I - \\frac{\\partial u}{\\partial w}\\Big)^j
          \\frac{\\partial u}{\\partial \\lambda},

at the current weights, with the training batch the optimiser just stepped on as the update map's context
(``on_train_batch_end``'s ``batch``) and the next batch of the named validation loader; then one Adam step
on the raw (log10 / logit) hyperparameters and the new natural values are written into
``optimizer.param_groups`` (see :class:`bilevel.integrations.OptimizerHyperStep`).

``pip install "bilevel[lightning]"`` installs Lightning (``lightning>=2.4``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..cursor import LoaderCursor
from ..loop import Every
from .engine import ModuleLoss, OptimizerHyperStep, parse_tune

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
else:
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # the module still imports (and documents); constructing the callback says what to install
        pl = None
        Callback = object

__all__ = ["HyperTuner"]

_INSTALL = 'bilevel.integrations.lightning needs PyTorch Lightning: pip install "bilevel[lightning]"'


def _loss_of(out: Any, what: str) -> Tensor:
    """The loss in a step's output: the tensor itself, or its ``"loss"`` entry."""
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise ValueError(
            f"HyperTuner: {what} returned {type(out).__name__}, not a loss: return the loss tensor (or a dict with "
            "'loss'), or pass val_loss=(module, batch) -> scalar"
        )
    return out


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class HyperTuner(Callback):
    """Tune the learning rate, momentum and weight decay of a LightningModule's optimiser online, by IFT.

    At every ``interval``-th optimiser step (``trainer.global_step``, so the cadence survives a resume) the
    callback

    1. takes the module's weights ``w_t`` and the optimiser's state (momentum buffers, Adam moments),
    2. computes ``dL_V/dlambda`` by the IFT on the update map ``u(lambda, w)`` of the optimiser's
       differentiable twin (Clarke et al. 2022, eq. 4-7; the inverse by ``lookback`` Neumann terms with the
       step chosen by power iteration, :class:`bilevel.AutoNeumann`; Lorraine et al. 2020, eq. 2-3),
       where the training loss ``L_T`` is the module's own ``training_step`` on the batch the optimiser just
       stepped on and ``L_V`` the validation loss of the next batch of ``val_dataloader`` (cycled),
    3. takes one Adam step (``hyper_lr``) on the raw hyperparameters (log10 learning rate and decay, logit
       momentum) and writes the natural values into ``optimizer.param_groups``,
    4. logs them through the module (``pl_module.log_dict``): ``hp/lr``, ``hp/momentum``, ... for scalar
       ones, ``hp/lr_group0``, ``hp/lr_group1``, ... for per-group ones (logged at every training batch,
       so ``log_every_n_steps`` picks them up).

    The validation loss is ``val_loss(module, batch)`` if given; else the module's ``validation_step(batch,
    0)`` output when it returns a loss (a tensor, or a dict with ``"loss"``); else ``training_step(batch, 0)``
    on the validation batch. It runs in eval mode, the training loss in train mode on copies of the module's
    buffers; calls to ``self.log`` inside these steps are muted. Dropout inside them draws from a random
    stream of the callback's own, and the validation loader is walked on its own stream
    (:class:`bilevel.cursor.LoaderCursor` with ``isolate_rng=True``), so Lightning's global RNG (shuffling,
    dropout of the real steps) sees exactly the draws it sees without the callback. Validation batches are
    moved with the module's ``transfer_batch_to_device``.

    What it needs and refuses: one ``torch.optim`` SGD, Adam, AdamW or RMSprop from ``configure_optimizers``
    (automatic optimisation), holding only the module's parameters; no learning-rate scheduler when ``lr`` is
    tuned (the scheduler would overwrite it; :class:`bilevel.integrations.transformers.HyperCallback` shows
    the multiplier that composes with one); gradient clipping by norm (applied in the twin too), not by
    value. Granularities ``"scalar"`` (one value for every group; the groups must agree) and ``"group"``
    (one per ``param_group``); ``"tensor"`` and ``"element"`` are refused, since ``param_groups`` hold one
    value per group (put a tensor in a group of its own for a value of its own, or use :class:`bilevel.Tuner`).
    With gradient accumulation the update map's training loss is the last micro-batch's.

    A loss-form ``penalty`` such as :class:`bilevel.PerWeightDecay` (built on the same module) is tuned too:
    its gradient ``dR/dw`` is added to the parameters' ``.grad`` before every optimiser step
    (``on_before_optimizer_step``, before clipping), so the real training minimises ``L_T + R``.

    Checkpoints: :meth:`state_dict` (Lightning saves it in every checkpoint) holds the raw hyperparameters, the
    hyperparameter optimiser's and the solver's state, the validation cursor, the callback's random stream and
    the last tuned step, as tensors, numbers and plain containers; ``trainer.fit(..., ckpt_path=...)`` resumes
    the tuning exactly where it stopped (the tuned values themselves are also in the checkpointed optimiser's
    ``param_groups``).

    Args:
        val_dataloader: a re-iterable loader of validation batches (a ``DataLoader``, a list of batches),
            cycled: each hyperparameter step takes its next batch.
        tune: names of the optimiser's hyperparameters to tune (``"lr"``, ``"momentum"``, ``"weight_decay"``;
            Adam's momentum is ``"beta1"``; any twin hyperparameter such as ``"eps"``), or ``{name:
            "scalar" | "group"}``. A value of 0 in the optimiser starts a weight decay at 1e-4 and a momentum
            at 0.01 (with a warning; the start is written into the groups).
        interval: T, optimiser steps between hyperparameter steps (Clarke et al.: 10).
        lookback: i, Neumann steps of the IFT solver (Clarke et al.: 5).
        hyper_lr: the learning rate of the hyperparameters' Adam (Clarke et al.: 0.05).
        penalty: an optional loss-form penalty (:class:`bilevel.PerWeightDecay`), tuned along.
        val_loss: optional ``(module, batch) -> scalar`` validation loss (see above for the default).
        seed: seeds the callback's random stream (dropout inside the hypergradient).
        log: log the tuned values through ``pl_module.log_dict``.

    Raises:
        ImportError: when Lightning is not installed.
    """

    def __init__(
        self,
        val_dataloader: Iterable[Any],
        tune: str | Sequence[str] | Mapping[str, str] = ("lr",),
        interval: int = 10,
        lookback: int = 5,
        hyper_lr: float = 0.05,
        penalty: Any = None,
        *,
        val_loss: ModuleLoss | None = None,
        seed: int = 0,
        log: bool = True,
    ) -> None:
        if pl is None:
            raise ImportError(_INSTALL)
        super().__init__()
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f"HyperTuner: interval must be an integer >= 1, got {interval!r}")
        self.val_dataloader = val_dataloader
        self.tune = parse_tune(tune, "HyperTuner")
        self.interval, self.lookback, self.hyper_lr = interval, lookback, hyper_lr
        self.schedule = Every(interval)  # when: the one loop's schedule (bilevel.loop)
        self.penalty, self.val_loss, self.seed, self.log_values = penalty, val_loss, seed, log
        self._cursor = LoaderCursor("val_dataloader", isolate_rng=True)
        self._cursor.bind(val_dataloader)  # refuses a one-shot iterator now, before training
        self._engine: OptimizerHyperStep | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step = 0  # the optimiser step of the last hyperparameter step
        self._batch_idx = 0
        self._use_validation_step: bool | None = None  # decided at the first validation loss
        self._metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ results

    @property
    def engine(self) -> OptimizerHyperStep:
        """The hyperparameter step (built when training starts): its :class:`~bilevel.tuner.OnlineTuner` is
        ``engine.tuner``."""
        if self._engine is None:
            raise RuntimeError("HyperTuner: training has not started yet")
        return self._engine

    @property
    def hparams(self) -> dict[str, float | list[float | None]]:
        """The tuned values in natural units: a float for a scalar one, one value per parameter group for a
        ``"group"`` one (``None`` for an empty group); a penalty's mean value."""
        e = self.engine
        out: dict[str, float | list[float | None]] = {}
        for name, per_group in e.values().items():
            out[name] = next(v for v in per_group if v is not None) if e.granularity[name] == "scalar" else per_group
        if self.penalty is not None:
            means = e.tuner.describe()
            out.update({h.name: float(means[h.name].reshape(-1)[0]) for h in self.penalty.hyperparameters})
        return out

    # ------------------------------------------------------------------ the losses

    def _train_fn(self, module: nn.Module, batch: Any) -> Tensor:
        return _loss_of(module.training_step(batch, self._batch_idx), "training_step")  # type: ignore[operator]

    def _val_fn(self, module: nn.Module, batch: Any) -> Tensor:
        if self.val_loss is not None:
            return self.val_loss(module, batch)
        if self._use_validation_step is None:
            overridden = type(module).validation_step is not pl.LightningModule.validation_step  # type: ignore[attr-defined]
            out = module.validation_step(batch, 0) if overridden else None  # type: ignore[operator]
            self._use_validation_step = isinstance(out, Tensor) or (
                isinstance(out, Mapping) and isinstance(out.get("loss"), Tensor)
            )
            if self._use_validation_step:
                return _loss_of(out, "validation_step")
        if self._use_validation_step:
            return _loss_of(module.validation_step(batch, 0), "validation_step")  # type: ignore[operator]
        return _loss_of(module.training_step(batch, 0), "training_step")  # type: ignore[operator]

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the hyperparameter step on the optimiser ``configure_optimizers`` returned.

        Lightning calls this after restoring a checkpoint (model, optimiser and this callback's state), so the
        tuning continues from it; a second ``fit`` with a new optimiser continues the tuning too.

        Args:
            trainer: the Lightning trainer.
            pl_module: the LightningModule being trained.

        Raises:
            ValueError: for manual optimisation, several optimisers, a scheduler while ``lr`` is tuned, clipping by
                value, or hyperparameters the optimiser lacks.
        """
        if not pl_module.automatic_optimization:
            raise ValueError("HyperTuner needs automatic optimisation (the optimiser step is Lightning's)")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"HyperTuner tunes one optimiser; configure_optimizers returned {len(trainer.optimizers)}")
        if "lr" in self.tune and trainer.lr_scheduler_configs:
            raise ValueError(
                "HyperTuner: tuning 'lr' while a learning-rate scheduler also sets it: drop the scheduler from "
                "configure_optimizers, or tune only momentum / weight decay"
            )
        clip = trainer.gradient_clip_val
        algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
        if clip and algorithm != "norm":
            raise ValueError(
                "HyperTuner: gradient clipping by value is not supported (clip by norm: it is in the twin)"
            )
        optimizer = trainer.optimizers[0]
        if self._engine is not None and self._engine.optimizer is not optimizer and self._pending is None:
            self._pending = self.state_dict()  # a new fit with a new optimiser: continue the tuning
        if self._engine is None or self._engine.optimizer is not optimizer:
            self._engine = OptimizerHyperStep(
                pl_module,
                optimizer,
                {k: v for k, v in self.tune.items()},
                self._train_fn,
                self._val_fn,
                penalty=self.penalty,
                interval=self.interval,
                lookback=self.lookback,
                hyper_lr=self.hyper_lr,
                grad_clip=float(clip) if clip else None,
                seed=self.seed,
                who="HyperTuner",
                context=lambda: self._muted(pl_module),
            )
        if self._pending is not None:
            sd, self._pending = self._pending, None
            self._engine.load_state_dict(sd["engine"])
            self._cursor.load_state_dict(sd["val_cursor"])
            self._last_step = int(sd["last_step"])
            self._engine.write()
        self._cursor.bind(self.val_dataloader)
        self._metrics = self._engine.metrics()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the tuned penalty's gradient ``dR(w; lambda)/dw`` to ``.grad`` (nothing without a penalty).

        Args:
            trainer: the Lightning trainer.
            pl_module: the LightningModule being trained.
            optimizer: the optimiser about to step.
        """
        if self.penalty is None or self._engine is None:
            return
        with torch.no_grad():
            for k, g in self._engine.penalty_grads().items():
                p = self._engine.named[k]
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the optimiser step: every ``interval`` steps one hyperparameter step; log the values.

        Args:
            trainer: the Lightning trainer (``global_step`` counts the optimiser steps).
            pl_module: the LightningModule being trained.
            outputs: ``training_step``'s output (unused).
            batch: the training batch the optimiser just stepped on: the update map's context.
            batch_idx: its index in the epoch.
        """
        engine = self.engine
        step = trainer.global_step
        if step > 0 and step != self._last_step and self.schedule.due(step, engine.tuner.hyper_steps):
            self._batch_idx = batch_idx
            val = self._cursor.next()
            val = pl_module.transfer_batch_to_device(val, pl_module.device, 0)
            engine.step(batch, val, step)
            self._last_step = step
            self._metrics = engine.metrics()
        if self.log_values and self._metrics:
            pl_module.log_dict(self._metrics, on_step=True, on_epoch=False, batch_size=1)

    @contextmanager
    def _muted(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """``self.log`` / ``self.log_dict`` are no-ops inside the user's steps run for a hypergradient."""
        d = pl_module.__dict__
        saved: dict[str, Any] = {k: d[k] for k in ("log", "log_dict") if k in d}
        d["log"] = d["log_dict"] = _noop
        try:
            yield
        finally:
            for k in ("log", "log_dict"):
                d.pop(k, None)
            d.update(saved)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The tuning state; Lightning stores it in every checkpoint.

        Returns:
            ``{"engine": raw hyperparameters, hyper-optimiser, solver and random stream
            (:meth:`bilevel.integrations.OptimizerHyperStep.state_dict`), "val_cursor": the validation loader's
            position, "last_step": the optimiser step of the last hyperparameter step}``: tensors, numbers and
            plain containers (loads with ``torch.load(..., weights_only=True)``).
        """
        if self._engine is None:
            return dict(self._pending) if self._pending is not None else {}
        return {
            "engine": self._engine.state_dict(),
            "val_cursor": self._cursor.state_dict(),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (applied when training starts, once the optimiser exists).

        Args:
            state_dict: a :meth:`state_dict` of a callback built the same way.
        """
        if state_dict:
            self._pending = dict(state_dict)
