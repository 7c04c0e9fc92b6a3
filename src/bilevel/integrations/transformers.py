"""Online hyperparameter tuning inside a Hugging Face ``transformers.Trainer``: the :class:`HyperCallback`.

::

    from bilevel.integrations.transformers import HyperCallback

    callback = HyperCallback(eval_dataset=eval_set, tune=("lr", "weight_decay"), interval=10)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                   callbacks=[callback])
    trainer.train()
    print(callback.lr_scale, callback.hparams)

The Trainer keeps its loop, its optimiser (AdamW by default) and its learning-rate schedule. Every
``interval`` optimiser steps the callback takes one hyperparameter step (Algorithm 1 of Lorraine et al. 2020 /
Clarke et al. 2022): the IFT hypergradient through the update map of the optimiser's differentiable twin,
Clarke et al. (2022) eq. 4-7, then one Adam step on the raw hyperparameters:

* the learning rate is tuned as a **multiplier of the schedule**, ``lr_t = m * schedule(t)`` with
  ``schedule(t) = base_lr * lambda(t)`` (every ``get_scheduler`` schedule but ``reduce_lr_on_plateau`` is a
  ``LambdaLR``, whose ``lr = base_lr * lambda(t)``): ``log10 m`` is tuned, and ``m * base_lr`` is written into
  the scheduler's ``base_lrs``, so warm-up and decay go on as scheduled around the tuned scale;
* the weight decay of the groups that decay (the Trainer puts biases and LayerNorm weights in a group with
  decay 0, which stays 0) is tuned in log10 space and written into ``optimizer.param_groups``.

``pip install "bilevel[transformers]"`` installs ``transformers`` and ``accelerate`` (the Trainer needs it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..cursor import LoaderCursor
from ..loop import Every
from ..module_spec import to_device
from .engine import ModuleLoss, OptimizerHyperStep, parse_tune

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
else:
    try:
        from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    except ImportError:  # the module still imports (and documents); constructing the callback says what to install
        TrainerCallback = object
        TrainerControl = TrainerState = TrainingArguments = Any

__all__ = ["HyperCallback", "model_loss"]

_INSTALL = 'bilevel.integrations.transformers needs Hugging Face transformers: pip install "bilevel[transformers]"'


def model_loss(model: nn.Module, batch: Any) -> Tensor:
    """The model's own loss: ``model(**batch).loss`` (a batch holding ``labels``).

    Args:
        model: a ``transformers`` model (or any module returning an object with ``.loss``).
        batch: a dict of tensors, e.g. ``input_ids``, ``attention_mask``, ``labels``.

    Returns:
        The scalar loss.
    """
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, Tensor):
        raise ValueError("HyperCallback: the model returned no loss: put 'labels' in the batches, or pass loss=")
    return loss


def _scheduler(lr_scheduler: Any) -> Any:
    """The ``LambdaLR`` (inside a wrapper with ``.scheduler``), whose ``lr = base_lr * lambda(t)``."""
    seen = 0
    while not hasattr(lr_scheduler, "lr_lambdas") and hasattr(lr_scheduler, "scheduler") and seen < 8:
        lr_scheduler, seen = lr_scheduler.scheduler, seen + 1
    if not (hasattr(lr_scheduler, "lr_lambdas") and hasattr(lr_scheduler, "base_lrs")):
        raise ValueError(
            f"HyperCallback tunes the learning rate as a multiplier of a LambdaLR schedule (lr = base_lr * "
            f"lambda(t)), got {type(lr_scheduler).__name__}: use an lr_scheduler_type other than "
            "reduce_lr_on_plateau, or leave 'lr' out of tune="
        )
    return lr_scheduler


class HyperCallback(TrainerCallback):
    """Tune a multiplier of the learning-rate schedule and the weight decay of a ``transformers.Trainer`` online.

    At every ``interval``-th optimiser step (``on_step_end``, after the optimiser and the scheduler stepped,
    ``state.global_step = t``) the callback

    1. takes the model's weights ``w_t`` and the optimiser's state (AdamW's moments),
    2. re-anchors the raw learning rate on the schedule's current value ``lr_t = m * base_lr * lambda(t)``
       (``log10 lr_t``; the hyperparameter optimiser's state is kept),
    3. computes ``dL_V/dlambda`` by the IFT on the update map ``u(lambda, w)`` of the optimiser's twin
       (Clarke et al. 2022, eq. 4-7; ``lookback`` Neumann terms with the step chosen by power iteration,
       Lorraine et al. 2020 eq. 2-3), with ``L_T`` and ``L_V`` the model's own loss (``model(**batch).loss``)
       on the next batch of the training and validation loaders below,
    4. takes one Adam step (``hyper_lr``) on log10 lr and log10 weight decay, and writes ``m <- m * lr_new /
       lr_t`` into the scheduler's ``base_lrs`` (``m * base_lr``), the group's ``lr = m * base_lr * lambda(t)``,
       and the new decays into ``optimizer.param_groups``.

    Why tuning log m is tuning log lr at the current step: with ``lr_t = m s(t)`` and the schedule value
    ``s(t) = base_lr lambda(t)`` fixed at the step, ``log lr_t = log m + log s(t)``, so ``d log lr_t / d log m = 1``
    and ``dL_V/dlog m = dL_V/dlog lr_t``; an Adam step of size delta on log10 lr_t is the step
    ``m <- m 10^delta`` on the multiplier, which then scales every later step of the schedule. (The IFT treats
    the learning rate as constant over the horizon the Neumann series looks at: the gradient is that of a
    schedule frozen at ``s(t)``, as in Clarke et al.'s treatment of one learning rate.) Steps where the schedule
    is 0 (the end of a linear decay) are skipped.

    Which batches: ``on_step_end`` is not given the batch the Trainer just trained on (callbacks receive the
    model, optimiser, scheduler and the dataloaders, not the inputs), so the update map's context is the next
    batch of a training loader of the callback's own: ``train_dataloader=`` if given, else a loader over the
    Trainer's training dataset with its data collator and ``per_device_train_batch_size``, shuffled by a
    generator seeded with ``seed`` (a batch from the same distribution; its order is independent of the
    Trainer's). The validation batches cycle through ``val_dataloader=``, or a loader over ``eval_dataset``
    (the Trainer's evaluation set, which callbacks cannot reach: pass it here) with the Trainer's collator
    and ``per_device_eval_batch_size``. Both loaders and the dropout inside the hypergradient draw from
    streams of the callback's own, so the Trainer's RNG is untouched. The Trainer's gradient clipping
    (``max_grad_norm``) is applied in the twin too; with gradient accumulation the twin sees one batch.

    The tuned values live in the Trainer's own checkpoints (``base_lrs`` in ``scheduler.pt``, the decays in
    ``optimizer.pt``); the hyperparameter optimiser's state, the multiplier and the loaders' positions are in
    :meth:`state_dict`, which the Trainer does not save: save it yourself to resume the tuning exactly.
    :attr:`history` holds one record per step; the latest values are also added to the Trainer's logs
    (``hp/lr_scale``, ``hp/lr``, ``hp/weight_decay``) when it logs.

    Args:
        eval_dataset: the validation examples (e.g. the Trainer's ``eval_dataset``); or give
        val_dataloader: a re-iterable loader of validation batches (dicts of tensors), cycled.
        tune: ``"lr"`` (the schedule's multiplier) and / or ``"weight_decay"`` (or another hyperparameter of
            the optimiser's twin), or ``{name: "scalar" | "group"}``; ``"group"`` gives one multiplier per group.
        train_dataloader: a re-iterable loader of training batches for the update map (default above).
        interval: T, optimiser steps between hyperparameter steps.
        lookback: i, Neumann steps.
        hyper_lr: the learning rate of the hyperparameters' Adam (Clarke et al.: 0.05).
        decay_groups: the parameter groups whose weight decay is tuned (default: those with a non-zero decay).
        loss: ``(model, batch) -> scalar`` (default :func:`model_loss`: ``model(**batch).loss``).
        seed: seeds the callback's training loader and random stream.

    Raises:
        ImportError: when ``transformers`` is not installed.
    """

    def __init__(
        self,
        eval_dataset: Dataset[Any] | None = None,
        *,
        val_dataloader: Iterable[Any] | None = None,
        tune: str | Sequence[str] | Mapping[str, str] = ("lr", "weight_decay"),
        train_dataloader: Iterable[Any] | None = None,
        interval: int = 10,
        lookback: int = 5,
        hyper_lr: float = 0.05,
        decay_groups: Sequence[int] | None = None,
        loss: ModuleLoss | None = None,
        seed: int = 0,
    ) -> None:
        if TrainerCallback is object:
            raise ImportError(_INSTALL)
        if (eval_dataset is None) == (val_dataloader is None):
            raise ValueError("HyperCallback: pass exactly one of eval_dataset= and val_dataloader=")
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f"HyperCallback: interval must be an integer >= 1, got {interval!r}")
        self.eval_dataset, self.val_dataloader, self.train_dataloader = eval_dataset, val_dataloader, train_dataloader
        self.tune = parse_tune(tune, "HyperCallback")
        self.interval, self.lookback, self.hyper_lr, self.seed = interval, lookback, hyper_lr, seed
        self.schedule = Every(interval)  # when: the one loop's schedule (bilevel.loop)
        self.decay_groups = None if decay_groups is None else [int(i) for i in decay_groups]
        self.loss = loss or model_loss
        self._train_cursor = LoaderCursor("train_dataloader", isolate_rng=True)
        self._val_cursor = LoaderCursor("val_dataloader", isolate_rng=True)
        self._engine: OptimizerHyperStep | None = None
        self._scheduler: Any = None
        self._base0: list[float] = []  # the schedule's own base_lrs (before any multiplier)
        self._scale: list[float] = []  # m per parameter group
        self._pending: dict[str, Any] | None = None
        self._last_step = 0
        #: one record per optimiser step: ``{"step", "lr_scale", "lr", ...tuned values}`` (per group: lists)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ results

    @property
    def engine(self) -> OptimizerHyperStep:
        """The hyperparameter step (built when training begins); its :class:`~bilevel.tuner.OnlineTuner` is
        ``engine.tuner``."""
        if self._engine is None:
            raise RuntimeError("HyperCallback: training has not begun yet")
        return self._engine

    @property
    def lr_scale(self) -> float | list[float]:
        """The learning-rate multiplier m (one per group with ``tune={"lr": "group"}``); 1 before any step."""
        if "lr" not in self.tune:
            return 1.0
        if not self._scale:
            return 1.0
        return self._scale[0] if self.tune["lr"] == "scalar" else list(self._scale)

    @property
    def hparams(self) -> dict[str, Any]:
        """The current values in natural units: ``lr`` (per group, the multiplier times the schedule now) and the
        other tuned ones (a float, or one value per group with ``None`` for groups not tuned)."""
        out: dict[str, Any] = {}
        for name, per_group in self.engine.values().items():
            if name == "lr":
                out[name] = [float(g["lr"]) for g in self.engine.optimizer.param_groups]
                continue
            given = [v for v in per_group if v is not None]
            out[name] = given[0] if len(given) == 1 else per_group
        return out

    # ------------------------------------------------------------------ building

    def _build(self, args: TrainingArguments, model: nn.Module, optimizer: Any, lr_scheduler: Any, train: Any) -> None:
        frozen: dict[str, list[int]] = {}
        groups = _groups(optimizer)
        if "weight_decay" in self.tune:
            decaying = (
                self.decay_groups
                if self.decay_groups is not None
                else [i for i, g in enumerate(groups) if float(g.get("weight_decay", 0.0)) != 0.0]
            )
            if not decaying:
                raise ValueError(
                    "HyperCallback: no parameter group decays the weights (TrainingArguments(weight_decay=0)): set "
                    "weight_decay > 0, pass decay_groups=[0] (the Trainer's decayed group), or leave 'weight_decay' "
                    "out of tune="
                )
            frozen["weight_decay"] = [i for i in range(len(groups)) if i not in decaying]
        if "lr" in self.tune:
            self._scheduler = _scheduler(lr_scheduler)
            if not self._base0:
                self._base0 = [float(b) for b in self._scheduler.base_lrs]
                self._scale = [1.0] * len(self._base0)
        clip = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        self._engine = OptimizerHyperStep(
            model,
            optimizer,
            self.tune,
            self.loss,
            self.loss,
            interval=self.interval,
            lookback=self.lookback,
            hyper_lr=self.hyper_lr,
            grad_clip=clip if clip > 0 else None,
            frozen_groups=frozen,
            seed=self.seed,
            who="HyperCallback",
        )
        self._train_cursor.bind(
            self.train_dataloader if self.train_dataloader is not None else self._own_train(args, train)
        )
        self._val_cursor.bind(self._own_val(args, train))

    def _own_train(self, args: TrainingArguments, train: Any) -> DataLoader[Any]:
        dataset = getattr(train, "dataset", None)
        if dataset is None:
            raise ValueError("HyperCallback: the Trainer's training dataloader has no dataset: pass train_dataloader=")
        iterable = isinstance(dataset, IterableDataset)
        return DataLoader(
            dataset,
            batch_size=int(args.per_device_train_batch_size),
            shuffle=not iterable,
            collate_fn=getattr(train, "collate_fn", None),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _own_val(self, args: TrainingArguments, train: Any) -> Iterable[Any]:
        if self.val_dataloader is not None:
            return self.val_dataloader
        return DataLoader(
            self.eval_dataset,  # type: ignore[arg-type]  # exactly one of the two is given
            batch_size=int(args.per_device_eval_batch_size),
            shuffle=False,
            collate_fn=getattr(train, "collate_fn", None),
        )

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Build the hyperparameter step on the Trainer's optimiser and schedule.

        A state given to :meth:`load_state_dict`, or the tuning of an earlier ``train()`` call, is continued.

        Args:
            args: the Trainer's arguments (batch sizes, ``max_grad_norm``).
            state: the Trainer's state.
            control: the Trainer's control flags.
            **kwargs: ``model``, ``optimizer``, ``lr_scheduler``, ``train_dataloader``, ... (as the Trainer gives).

        Raises:
            ValueError: for a schedule that is not a ``LambdaLR`` while ``lr`` is tuned, no decaying group while
                ``weight_decay`` is tuned, or an optimiser without a differentiable twin.
        """
        if self._engine is not None and self._pending is None:
            self._pending = self.state_dict()
        self._build(
            args, kwargs["model"], kwargs["optimizer"], kwargs.get("lr_scheduler"), kwargs.get("train_dataloader")
        )
        if self._pending is not None:
            sd, self._pending = self._pending, None
            self.engine.load_state_dict(sd["engine"])
            self._train_cursor.load_state_dict(sd["train_cursor"])
            self._val_cursor.load_state_dict(sd["val_cursor"])
            self._base0, self._scale = [float(v) for v in sd["base0"]], [float(v) for v in sd["scale"]]
            self._last_step = int(sd["last_step"])
            self._train_cursor.bind(
                self.train_dataloader
                if self.train_dataloader is not None
                else self._own_train(args, kwargs.get("train_dataloader"))
            )
            self._val_cursor.bind(self._own_val(args, kwargs.get("train_dataloader")))
            self.engine.write([n for n in self.engine.update_form if n != "lr"])
            self._compose()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """After the optimiser and scheduler steps: every ``interval`` steps one hyperparameter step.

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state (``global_step`` counts the optimiser steps).
            control: the Trainer's control flags.
            **kwargs: as the Trainer passes them (unused: the engine holds the model and optimiser).
        """
        engine = self.engine
        t = int(state.global_step)
        if (
            t > 0
            and t != self._last_step
            and self.schedule.due(t, engine.tuner.hyper_steps)
            and self._schedule_positive()
        ):
            device = next(iter(engine.named.values())).device
            train = to_device(self._train_cursor.next(), device)
            val = to_device(self._val_cursor.next(), device)
            groups = engine.optimizer.param_groups
            if "lr" in self.tune:
                current: list[float | None] = [float(g["lr"]) for g in groups]
                engine.set_values("lr", current)
                before = engine.values()["lr"]
            engine.step(train, val, t)
            if "lr" in self.tune:
                after = engine.values()["lr"]
                for i, (b, a) in enumerate(zip(before, after)):
                    if a is not None and b is not None and b > 0:
                        self._scale[i] *= a / b
                self._compose()
            self._last_step = t
        record: dict[str, Any] = {"step": t, "lr_scale": self.lr_scale}
        record.update(self.hparams)
        self.history.append(record)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the latest values (``hp/lr_scale``, ``hp/lr``, ``hp/weight_decay``, ...) to the Trainer's logs.

        Args:
            args: the Trainer's arguments.
            state: the Trainer's state; its last ``log_history`` entry gets the values too.
            control: the Trainer's control flags.
            logs: the dict being logged (updated in place).
            **kwargs: as the Trainer passes them.
        """
        if logs is None or self._engine is None:
            return
        metrics = self.engine.metrics()
        if "lr" in self.tune:  # the learning rate in use now (the multiplier times the schedule's value)
            lrs = [float(g["lr"]) for g in self.engine.optimizer.param_groups]
            for i, lr in enumerate(lrs):
                key = "hp/lr" if self.tune["lr"] == "scalar" or len(lrs) == 1 else f"hp/lr_group{i}"
                if key in metrics:
                    metrics[key] = lr
        scale = self.lr_scale
        if isinstance(scale, list):
            metrics.update({f"hp/lr_scale_group{i}": float(s) for i, s in enumerate(scale)})
        elif "lr" in self.tune:
            metrics["hp/lr_scale"] = float(scale)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    # ------------------------------------------------------------------ the multiplier

    def _schedule_positive(self) -> bool:
        """Whether every tuned group's learning rate is > 0 now (a log10-space step cannot start from 0)."""
        if "lr" not in self.tune:
            return True
        return all(float(g["lr"]) > 0 for g in self.engine.optimizer.param_groups)

    def _compose(self) -> None:
        """``base_lrs[i] = m_i base_lr_i`` and the group's ``lr = base_lrs[i] lambda_i(t)`` (the schedule's value)."""
        if self._scheduler is None:
            return
        s = self._scheduler
        for i, group in enumerate(s.optimizer.param_groups):
            s.base_lrs[i] = self._scale[i] * self._base0[i]
            lr = s.base_lrs[i] * s.lr_lambdas[i](s.last_epoch)
            if isinstance(group["lr"], Tensor):
                with torch.no_grad():
                    group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The tuning state (the Trainer does not save it: save it next to its checkpoint).

        Returns:
            ``{"engine": raw values, hyper-optimiser, solver and random stream, "train_cursor", "val_cursor": the
            loaders' positions, "base0": the schedule's own base_lrs, "scale": the multipliers m, "last_step"}``:
            tensors, numbers and plain containers (loads with ``torch.load(..., weights_only=True)``).
        """
        if self._engine is None:
            return dict(self._pending) if self._pending is not None else {}
        return {
            "engine": self._engine.state_dict(),
            "train_cursor": self._train_cursor.state_dict(),
            "val_cursor": self._val_cursor.state_dict(),
            "base0": list(self._base0),
            "scale": list(self._scale),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (applied when the next training begins).

        Args:
            state_dict: a :meth:`state_dict` of a callback built the same way.
        """
        if state_dict:
            self._pending = dict(state_dict)


def _groups(optimizer: Any) -> list[dict[str, Any]]:
    return list(optimizer.param_groups)
