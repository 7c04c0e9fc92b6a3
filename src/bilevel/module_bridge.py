"""Between an ``nn.Module`` and the functional loop: the front door's losses, buffers, evaluation and write-back.

:class:`ModuleBridge` (a base class of :class:`bilevel.Tuner`) evaluates the user's loss at weights given as a
dict (``torch.func.functional_call``; a population through ``vmap``; under ``autocast`` when asked), keeps the
module's BatchNorm statistics as the loop steps (a weight step's statistics become the model's; rollbacks
restore them with the weights), evaluates on a validation loader without touching torch's RNG, and writes the
best member's weights, buffers, optimiser state and tuned values back into the model and the optimiser.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from . import functional as Fn
from . import population as pop
from .cursor import isolated_rng
from .hparams import Granularity, HyperParameterSpace
from .module_spec import ModuleLoss, batch_size, to_device
from .tuner import OnlineTuner
from .updates import TorchTwin, state_to_torch

__all__ = ["ModuleBridge"]


class ModuleBridge:
    """The module side of :class:`bilevel.Tuner` (see the module docstring)."""

    model: nn.Module
    device: torch.device
    P: int
    autocast: torch.dtype | None
    penalty: Any
    space: HyperParameterSpace
    loop: OnlineTuner
    _dp: bool
    _tied: bool  # the model holds a tensor under two names (bilevel.functional.tied), checked at construction
    _dtype: torch.dtype
    _train: ModuleLoss
    _val: ModuleLoss
    _buffers: dict[str, Tensor]
    _good_buffers: dict[str, Tensor]
    _pending: dict[str, Tensor] | None
    _pending_loss: Tensor | None
    _epoch_losses: list[Tensor]
    _twin: TorchTwin | None
    _torch_opt: torch.optim.Optimizer | None
    _rule: Any
    _val_last: Tensor
    history: list[dict[str, Any]]

    rule: Any  # the Tuner's
    _all_diverged: Callable[[], None]

    # ------------------------------------------------------------------ construction helpers

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
            value = Fn.call(self.model, p, fn, batch, buffers=b, tie_weights=self._tied)
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
                    batch = to_device(batch, self.device)
                    n = batch_size(batch)
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
        # e.g. bilevel.callbacks.TensorBoardLogger: per-epoch curves of every member
        self.loop.callback("on_epoch", {"train": train, "val": val})
