"""The hyperparameter step both callbacks take at their trainer's cadence (:class:`OptimizerHyperStep`).

It builds the one online loop's state (:class:`bilevel.tuner.OnlineTuner`) around a ``torch.optim``
optimiser's differentiable twin and takes :meth:`~bilevel.tuner.OnlineTuner.hyper_step` when the trainer says;
see :mod:`bilevel.integrations` for the maths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as Fn
from ..cursor import isolated_rng
from ..hparams import Granularity, HyperParameter, HyperParameterSpace, for_rule, start_value
from ..module_spec import ModuleLoss
from ..tuner import OnlineTuner, TunerConfig
from ..updates import UpdateRule, WithDefaults, state_from_torch, twin

__all__ = ["OptimizerHyperStep", "parse_tune", "ModuleLoss"]


#: the optimisers whose differentiable twin exists (:func:`bilevel.updates.twin`)
_TWINNED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimiser inside a wrapper (accelerate's ``AcceleratedOptimizer``, ...)."""
    seen = 0
    while not isinstance(optimizer, _TWINNED) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, _TWINNED):
        raise ValueError(
            f"cannot tune the hyperparameters of {type(optimizer).__name__}: the differentiable twin exists for "
            "torch.optim.SGD, Adam, AdamW and RMSprop"
        )
    return optimizer


def _start(h: HyperParameter, value: float, what: str, decay: bool) -> float:
    """:func:`bilevel.hparams.start_value` with the callback's name in its messages (as ``bilevel.Tuner``)."""
    return start_value(h, value, decay=decay, who=f"{what}: ")


def _group_value(group: Mapping[str, Any], name: str) -> float:
    """A parameter group's value of the twin's hyperparameter ``name`` (``beta1``/``beta2`` from ``betas``)."""
    if name in ("beta1", "beta2"):
        value = group["betas"][0 if name == "beta1" else 1]
    else:
        value = group[name]
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def _set_group_value(group: dict[str, Any], name: str, value: float) -> None:
    """Write ``value`` into a parameter group (a tensor-valued ``lr`` is filled in place, ``betas`` rebuilt)."""
    if name in ("beta1", "beta2"):
        b1, b2 = group["betas"]
        group["betas"] = (value, b2) if name == "beta1" else (b1, value)
        return
    old = group.get(name)
    if isinstance(old, Tensor):
        with torch.no_grad():
            old.fill_(value)
    else:
        group[name] = value


def parse_tune(tune: str | Sequence[str] | Mapping[str, str], who: str) -> dict[str, str]:
    """``tune=`` as ``{name: granularity}`` (names alone: ``"scalar"``); refuses per-tensor granularities.

    Args:
        tune: names of the optimiser's hyperparameters, or ``{name: "scalar" | "group"}``.
        who: the callback's name, for messages.

    Returns:
        ``{name: granularity}``.

    Raises:
        ValueError: for an unknown granularity, or ``"tensor"`` / ``"element"``, which ``param_groups`` cannot hold.
    """
    items = (
        list(tune.items())
        if isinstance(tune, Mapping)
        else [(n, "scalar") for n in ((tune,) if isinstance(tune, str) else tune)]
    )
    out: dict[str, str] = {}
    for name, g in items:
        try:
            gran = Granularity(g)
        except ValueError:
            raise ValueError(f"{who}: tune[{name!r}]: unknown granularity {g!r}; use 'scalar' or 'group'") from None
        if gran in (Granularity.TENSOR, Granularity.ELEMENT):
            raise ValueError(
                f"{who}: tune[{name!r}]={g!r} is not supported: the trainer steps a torch.optim optimiser, whose "
                "param_groups hold one value per group; use 'scalar' or 'group' (put tensors in groups of their own "
                "for one value each), or bilevel.Tuner for per-tensor / per-weight values"
            )
        out[str(name)] = gran.value
    return out


class OptimizerHyperStep:
    """The hyperparameter step of a ``torch.optim`` optimiser that another trainer steps (shared by the callbacks).

    It builds an :class:`~bilevel.tuner.OnlineTuner` on the optimiser's differentiable twin (one model,
    ``stacked=False``) whose weight loop is never run: at each :meth:`step` the tuner's weights are the
    module's (detached), its optimiser state the optimiser's (:func:`bilevel.updates.state_from_torch`), its
    step count the trainer's, and one :meth:`~bilevel.tuner.OnlineTuner.hyper_step` moves the raw
    hyperparameters along the IFT hypergradient of the update map (Clarke et al. 2022, eq. 4-7). The new
    natural values are written into ``optimizer.param_groups`` (:meth:`write`).

    The training loss runs the module in train mode on copies of its buffers (BatchNorm statistics are never
    updated by a hypergradient); the validation loss in eval mode. Random numbers drawn inside (dropout)
    come from a CPU stream of the step's own (seeded by ``seed``, saved in :meth:`state_dict`), so the
    trainer's global RNG is left as it was: with the callback, the trainer draws the same shuffles and
    dropout masks as without it.

    Args:
        module: the model (its trainable parameters held by ``optimizer`` are the weights w).
        optimizer: a ``torch.optim`` SGD, Adam, AdamW or RMSprop (or a wrapper with ``.optimizer``).
        tune: ``{name: "scalar" | "group"}`` of the twin's hyperparameters (``lr``, ``momentum``,
            ``weight_decay``, ``beta1``, ...).
        train_loss: ``(module, batch) -> scalar``, the training loss L_T of a batch.
        val_loss: ``(module, batch) -> scalar``, the validation loss L_V.
        penalty: optional loss-form penalty such as :class:`bilevel.PerWeightDecay` (tuned too; its gradient
            must be added to the trainer's, see :meth:`penalty_grads`).
        interval: T, the optimiser steps between hyperparameter steps (the caller's cadence; kept in the config).
        lookback: i, the Neumann steps of :class:`bilevel.AutoNeumann`.
        hyper_lr: the Adam learning rate of the raw hyperparameters (Clarke et al.: 0.05).
        grad_clip: the trainer's gradient-norm clipping, applied in the twin too.
        frozen_groups: ``{name: group indices}`` whose value of ``name`` is kept as the optimiser holds it
            (e.g. the no-decay group of biases and LayerNorm weights); ``name`` is then tuned per group.
        seed: seeds the step's own random stream.
        who: the caller's name, for messages.
        context: a context manager factory wrapped around every hyperparameter step (e.g. muting logging).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Any,
        tune: Mapping[str, str],
        train_loss: ModuleLoss,
        val_loss: ModuleLoss,
        *,
        penalty: Any = None,
        interval: int = 10,
        lookback: int = 5,
        hyper_lr: float = 0.05,
        grad_clip: float | None = None,
        frozen_groups: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        who: str = "OptimizerHyperStep",
        context: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.module, self.optimizer, self.who = module, _unwrap(optimizer), who
        self._train_fn, self._val_fn, self.penalty = train_loss, val_loss, penalty
        self._context = context or nullcontext
        self.named = self._held(module, self.optimizer)
        penalty_h = {h.name: h for h in (penalty.hyperparameters if penalty is not None else [])}
        frozen = {k: sorted({int(i) for i in v}) for k, v in (frozen_groups or {}).items()}
        kinds = dict(tune)
        for name in frozen:
            if name in kinds:
                kinds[name] = "group"  # some groups keep their value: one raw value per tuned group
        tw = twin(self.optimizer, self.named)
        unknown = [n for n in kinds if n not in tw.rule.hyperparameters and n not in penalty_h]
        if unknown:
            hint = (
                " (Adam's momentum is 'beta1')" if "momentum" in unknown and "beta1" in tw.rule.hyperparameters else ""
            )
            raise ValueError(
                f"{who}: cannot tune {unknown}: torch.optim.{type(self.optimizer).__name__} has "
                f"{list(tw.rule.hyperparameters)}{hint}" + (f", the penalty has {list(penalty_h)}" if penalty_h else "")
            )
        self.groups: tuple[tuple[str, ...], ...] = tw.groups
        self.update_form = [n for n in kinds if n not in penalty_h]
        self.frozen = {n: frozen.get(n, []) for n in self.update_form}
        self.granularity = {n: kinds[n] for n in self.update_form}

        # ---- start values: the optimiser's, moved off the edges of their domains (and written back)
        specs: list[HyperParameter] = []
        init: dict[str, Any] = {}
        starts: dict[str, list[float | None]] = {}
        used = [i for i, g in enumerate(self.groups) if g]
        for name in self.update_form:
            gran = self.granularity[name]
            values = [_group_value(g, name) for g in self.optimizer.param_groups]
            tuned = [i for i in used if i not in self.frozen[name]]
            if not tuned:
                raise ValueError(f"{who}: {name!r}: every parameter group is frozen; nothing to tune")
            if gran == "scalar":
                h = for_rule(name, "scalar")
                distinct = sorted({values[i] for i in tuned})
                if len(distinct) > 1:
                    raise ValueError(
                        f"{who}: the optimiser's parameter groups differ in {name} ({values}): tune it per group "
                        f"(tune={{{name!r}: 'group'}})"
                    )
                v = _start(h, distinct[0], who, name == "weight_decay")
                init[name] = v
                starts[name] = [v if i in tuned else None for i in range(len(values))]
            else:
                grouped = tuple(g if i in tuned else () for i, g in enumerate(self.groups))
                h = for_rule(name, "group", groups=grouped)
                decay = name == "weight_decay"
                first = _start(h, values[tuned[0]], who, decay)
                per = [_start(h, values[i], who, decay) if i in tuned else first for i in range(len(values))]
                init[name] = per
                starts[name] = [per[i] if i in tuned else None for i in range(len(values))]
            specs.append(h)
        for name, h in penalty_h.items():
            specs.append(h)
            init[name] = _start(h, float(penalty.initial()[name]), who, decay=True)
        if not specs:
            raise ValueError(f"{who}: nothing to tune: name at least one hyperparameter in tune= or give a penalty")
        self._write_values(starts)
        tw = twin(self.optimizer, self.named)  # the twin of the optimiser with the start values
        extra = {  # groups kept at the optimiser's value: every parameter's value, for the rule to fill in
            n: {k: _group_value(g, n) for g, names in zip(self.optimizer.param_groups, self.groups) for k in names}
            for n in self.update_form
            if self.frozen[n]
        }
        self.rule: UpdateRule = WithDefaults(tw.rule, {**tw.per_param, **extra}) if extra else tw.with_defaults()
        self.space = HyperParameterSpace(specs)
        params = {k: v.detach() for k, v in self.named.items()}
        raw = self.space.from_natural(params, init)
        self.tuner = OnlineTuner(
            params,
            raw,
            self.space,
            self.rule,
            self._train_loss,
            self._val_loss,
            update_form=self.update_form,
            penalty=self._penalty if penalty is not None else None,
            config=TunerConfig(
                tuned=tuple(self.space.names),
                interval=interval,
                lookback=lookback,
                hyper_lr=hyper_lr,
                grad_clip=grad_clip,
            ),
            stacked=False,
        )
        gen = torch.Generator()
        gen.manual_seed(seed)
        self._rng: Tensor = gen.get_state()  # the CPU stream the hyperparameter steps draw from

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _held(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        """The module's trainable parameters the optimiser holds; refuses tensors that are not the module's."""
        trainable = {k: v for k, v in module.named_parameters() if v.requires_grad}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        ids = {id(p) for p in trainable.values()}
        foreign = [tuple(p.shape) for p in held if id(p) not in ids]
        if foreign:
            raise ValueError(
                f"the {type(optimizer).__name__} optimiser holds tensors of shapes {foreign} that are not the "
                "module's trainable parameters: build it on module.parameters()"
            )
        held_ids = {id(p) for p in held}
        named: dict[str, Tensor] = {k: v for k, v in trainable.items() if id(v) in held_ids}
        if not named:
            raise ValueError("the optimiser holds none of the module's trainable parameters")
        return named

    # ------------------------------------------------------------------ the losses, as functions of the weights

    def _train_loss(self, params: Mapping[str, Tensor], nat: Any, batch: Any) -> Tensor:
        self.module.train(True)
        buffers = {k: v.clone() for k, v in self.module.named_buffers()}  # BatchNorm updates land in copies
        return self._scalar(Fn.call(self.module, params, self._train_fn, batch, buffers=buffers), "training")

    def _val_loss(self, params: Mapping[str, Tensor], nat: Any, batch: Any) -> Tensor:
        self.module.train(False)
        return self._scalar(Fn.call(self.module, params, self._val_fn, batch), "validation")

    def _penalty(self, params: Mapping[str, Tensor], nat: Mapping[str, Any]) -> Tensor:
        value: Tensor = self.penalty(params, nat)
        return value

    def _scalar(self, value: Any, what: str) -> Tensor:
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(
                f"{self.who}: the {what} loss must be a scalar tensor, got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
            )
        return value.reshape(())

    # ------------------------------------------------------------------ the step

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run the block on this step's own CPU stream; the global RNGs (CPU and CUDA) are put back afterwards."""
        with isolated_rng():
            torch.set_rng_state(self._rng)
            try:
                yield
            finally:
                self._rng = torch.get_rng_state()

    def sync(self, t: int) -> None:
        """Point the tuner at the module's weights (detached, not copied) and the optimiser's state.

        Args:
            t: the trainer's optimiser steps so far (the tuner's ``t``, at least 1).
        """
        self.tuner.params = {k: v.detach() for k, v in self.named.items()}
        self.tuner.state = state_from_torch(self.optimizer, self.named, self.rule)
        self.tuner.t = max(int(t), 1)

    def step(self, train_batch: Any, val_batch: Any, t: int) -> None:
        """One hyperparameter step after the trainer's optimiser step ``t``; writes the new values into the groups.

        The hypergradient is taken at the current weights ``w_t`` with the training batch ``train_batch``
        (the update map's context) and the validation batch ``val_batch`` (Clarke et al. 2022, Alg. 1).

        Args:
            train_batch: a training batch, on the module's device.
            val_batch: a validation batch, on the module's device.
            t: the optimiser steps taken so far (>= 1).
        """
        was_training = self.module.training
        self.sync(t)
        try:
            with self._context(), self._own_rng():
                self.tuner.hyper_step(train_batch, val_batch)
            self.tuner.hyper_steps += 1
        finally:
            self.module.train(was_training)
        self.write()

    # ------------------------------------------------------------------ values

    def values(self) -> dict[str, list[float | None]]:
        """The natural value of each tuned optimiser hyperparameter, per parameter group.

        Returns:
            ``{name: [value of group 0, value of group 1, ...]}`` with ``value = T(raw)`` (``10 ** raw`` for a
            learning rate or decay, ``sigmoid(raw)`` for a momentum), ``None`` for a group where ``name`` is not
            tuned (frozen or empty).
        """
        out: dict[str, list[float | None]] = {}
        n = len(self.optimizer.param_groups)
        with torch.no_grad():
            for name in self.update_form:
                h = self.space[name]
                if self.granularity[name] == "scalar":
                    v = float(h.to_natural(self.tuner.raw[name].detach()))
                    out[name] = [None if i in self.frozen[name] else v for i in range(n)]
                else:
                    out[name] = [
                        float(h.to_natural(self.tuner.raw[k].detach())) if (h.groups or ())[i] else None
                        for i, k in enumerate(h.group_keys())
                    ]
        return out

    def set_values(self, name: str, values: Sequence[float | None]) -> None:
        """Set the raw value of ``name`` to ``T^{-1}`` of the natural ``values``, keeping the hyper-optimiser's state.

        The Hugging Face callback re-anchors the learning rate on the schedule's current value this way before
        each hyperparameter step (the Adam moments of ``log10 lr`` are those of ``log10 m``).

        Args:
            name: a tuned optimiser hyperparameter.
            values: one natural value per parameter group (a scalar hyperparameter takes the first given);
                ``None`` leaves a group's value as it is.
        """
        h = self.space[name]
        with torch.no_grad():
            if self.granularity[name] == "scalar":
                given = [v for v in values if v is not None]
                if given:
                    r = self.tuner.raw[name]
                    r.copy_(h.to_raw(float(given[0])).to(r.dtype))
                return
            for key, v, grp in zip(h.group_keys(), values, h.groups or ()):
                if v is not None and grp:
                    r = self.tuner.raw[key]
                    r.copy_(h.to_raw(float(v)).to(r.dtype))

    def _write_values(self, values: Mapping[str, Sequence[float | None]]) -> None:
        for name, per_group in values.items():
            for group, v in zip(self.optimizer.param_groups, per_group):
                if v is not None:
                    _set_group_value(group, name, v)

    def write(self, names: Sequence[str] | None = None) -> None:
        """Write the tuned natural values into ``optimizer.param_groups`` (``betas`` for ``beta1`` / ``beta2``).

        Args:
            names: the hyperparameters to write (default: every tuned one); frozen groups are left alone.
        """
        vals = self.values()
        self._write_values({k: v for k, v in vals.items() if names is None or k in names})

    def metrics(self, prefix: str = "hp/") -> dict[str, float]:
        """The tuned values as flat metrics, for a logger.

        Args:
            prefix: put before every name.

        Returns:
            ``{"hp/lr": ..., "hp/lr_group1": ..., "hp/l2": ...}``: a scalar value by its name, a per-group value by
            group (tuned groups only; a single tuned group by its name), a penalty's mean natural value.
        """
        out: dict[str, float] = {}
        for name, per_group in self.values().items():
            tuned = [(i, v) for i, v in enumerate(per_group) if v is not None]
            if self.granularity[name] == "scalar" or len(tuned) == 1:
                out[prefix + name] = float(tuned[0][1])
            else:
                out.update({f"{prefix}{name}_group{i}": float(v) for i, v in tuned})
        if self.penalty is not None:
            means = self.tuner.describe()
            for h in self.penalty.hyperparameters:
                out[prefix + h.name] = float(means[h.name].reshape(-1)[0])
        return out

    def penalty_grads(self) -> dict[str, Tensor]:
        """The penalty's gradient at the module's weights and the tuned values, to add to the trainer's ``.grad``.

        Returns:
            ``{param_name: dR(w; lambda)/dw}`` (``lambda * w`` for :class:`bilevel.PerWeightDecay`, Lorraine et al.
            2020 sec. 5.2); empty without a penalty.
        """
        if self.penalty is None:
            return {}
        w = {k: v.detach().requires_grad_() for k, v in self.named.items()}
        with torch.enable_grad():
            nat = self.tuner.natural({k: v.detach() for k, v in self.tuner.raw.items()})
            value = self.penalty(w, nat)
            grads = torch.autograd.grad(value, list(w.values()), allow_unused=True)
        return {k: g for k, g in zip(w, grads) if g is not None}

    # ------------------------------------------------------------------ checkpointing

    #: the tuner's state that is re-synchronised from the module and optimiser before every step (not saved)
    _LIVE = ("params", "initial_params", "state", "window", "prev", "history", "good")

    def state_dict(self) -> dict[str, Any]:
        """The tuning state, for a checkpoint (the weights and the optimiser state are the trainer's: not saved).

        Returns:
            ``{"tuner": the OnlineTuner's state without its weights, optimiser state and history (raw
            hyperparameters, hyper-optimiser and solver state, step count), "rng": this step's random stream}``:
            tensors, numbers and plain containers (loads with ``torch.load(..., weights_only=True)``).
        """
        sd = {k: v for k, v in self.tuner.state_dict().items() if k not in self._LIVE}
        return {"tuner": sd, "rng": self._rng.clone()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the weights and optimiser state come from the trainer at each step).

        Args:
            sd: a :meth:`state_dict` of a step built the same way.
        """
        full = {**self.tuner.state_dict(), **dict(sd["tuner"])}
        self.tuner.load_state_dict(full)
        self._rng = sd["rng"].clone()
