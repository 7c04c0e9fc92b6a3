"""Data-parallel hypergradients with ``torch.distributed``: global losses whose every derivative is global.

Under ``torchrun --nproc_per_node=N`` each rank r holds the same weights w and hyperparameters lambda
(*replicated* tensors) and a shard B_r of every global batch (``DistributedSampler``). The bilevel
problem is posed on the *global* losses

    L(w, lambda) = (1/N) sum_r l_r(w, lambda),      l_r = the loss on B_r (the mean over B_r),

for training and validation alike, and the hypergradient needs every derivative of them: the training
gradient, the validation gradient, each Hessian- or Jacobian-vector product of a solver (products taken by
``torch.autograd.grad``, with ``create_graph=True`` inside: double backward) and the mixed partials with
respect to lambda. :func:`data_parallel_loss` wraps a loss ``loss(params, hparams, batch)`` so that it
returns L, replicated on every rank, as a function whose derivatives of *every order* are those of L.

**The maths.** Stack the ranks' tensors into one vector. A replicated tensor is one value w; a rank-local
tensor is a stack (y_1, ..., y_N). Two linear maps connect the two worlds (Megatron-LM's conjugate pair):

* ``f`` = ``_Copy``: w -> (w, ..., w), i.e. f = E with E the stack of N identities. Forward: identity on
  each rank. Backward (the transpose E^T): the all-reduce SUM of the ranks' cotangents.
* ``g`` = ``_Reduce``: (y_1, ..., y_N) -> sum_r y_r, i.e. g = E^T. Forward: the all-reduce SUM. Backward
  (the transpose E): the identity on each rank (every rank already holds the replicated cotangent).

The wrapped loss is L = g((1/N) l(f(w), f(lambda))), with l = (l_1, ..., l_N) acting block-diagonally
(each rank evaluates its own l_r on its own shard: no communication). By the chain rule,
dL/dw = E^T (1/N) (dl/dw) E = (1/N) sum_r dl_r/dw, the global gradient, on every rank. Reverse mode applies
the transpose of each linear map, and f and g are each other's transposes, so each Function's backward
*is the other Function* (``_Copy.backward`` calls ``_Reduce.apply`` and vice versa): a backward pass is
again a program made of local differentiable operations and the two linear maps, recorded by autograd
when ``create_graph=True``. A linear map's derivative is itself (no second-order term is lost), so by
induction the k-th derivative program computes exactly the k-th derivative of L: Hessian-vector products
(grad of grad), the mixed partials d^2 L / dw dlambda, and higher, on every rank, replicated. The only
requirements: every tensor the losses differentiate and that is replicated enters through ``params`` or
``hparams`` (a tensor captured from a closure would get its rank-local gradient only), everything
downstream of L is replicated computation (so the cotangent that ``g``'s identity backward receives is the
same on every rank: true for the tuner's sums, solvers and optimisers), and the ranks' shards have equal
sizes (then the global mean over all examples is the mean of the ranks' means). Equal shard sizes are the
user's job: ``DistributedSampler(drop_last=True)``, or its padding (which repeats a few examples), and a
``DataLoader(drop_last=True)`` so that every rank's batches have the same size.

**Communication** (W the number of weight elements, H the hyperparameter elements the *losses* read;
counted with :func:`torch.distributed.all_reduce`, each tensor group flattened into one bucket, one bucket
per dtype and device):

* each loss evaluation: 1 all-reduce of the loss value (1 element, P for a population);
* a training gradient dL_T/dw (with or without ``create_graph``): 1 all-reduce of W;
* the validation gradient (w and lambda together): 1 of W, plus 1 of H if the validation loss reads a
  tuned hyperparameter;
* each solver product x^T J (``rmatvec``: a Neumann term, a power-iteration or CG step): 1 of W; a product
  J x (``matvec``, by the double-vjp trick: CG on the normal equations, ``Exact``): 2 of W;
* the mixed product x^T dr/dlambda: none when the losses read no tuned hyperparameter (update-form tuning,
  where lambda enters through the replicated update rule; loss-form tuning through ``penalty=``, a
  replicated term that is *not* wrapped); 1 of H when the training loss reads them;
* the hyperparameter update: none (every rank holds the same hypergradient and steps the same optimiser);
* each GlobalBatchNorm layer of C channels (see BatchNorm below): 1 of 2C + 1 per training-mode forward
  and per backward pass through it.

So an IFT hyperparameter step with ``Neumann(i)`` costs i + 2 all-reduces of W and 2 of one element (AutoNeumann
adds its power iteration's ``iters`` products of W when it (re-)estimates its step), and each weight step
1 of W and 1 of one element: the weight step communicates as much as ``DistributedDataParallel`` does.
Every rank must run the same sequence of loss evaluations and backward passes (a collective that one rank
skips blocks the others): branch only on replicated values (losses, gradients, hypergradients).

**Refused.** FSDP (``FullyShardedDataParallel`` and FSDP2's ``fully_shard``/``FSDPModule``): its sharded
parameters are gathered and its gradients reduce-scattered by hooks that autograd's double backward does
not see, so second-order gradients are not supported by FSDP (:func:`refuse_fsdp`). A
``DistributedDataParallel`` model is evaluated through its inner module (:func:`unwrap`): DDP's gradient
hooks are bypassed, the collectives above average the gradients instead. The supported hypergradient
backend is ``"autograd"`` (the default): ``torch.func`` transforms of a wrapped loss (``backend="func"`` or
``"compile"``) are untested (a first-order ``torch.func.grad`` works), and ``vmap`` cannot map over a
collective; a population's ``vmap`` goes *inside* the loss (:func:`bilevel.population.vmap_loss`), which is
fine.

**BatchNorm.** Plain ``BatchNorm`` normalises with each rank's local batch statistics, as under DDP; the
global loss is then the mean of the ranks' losses each with its own statistics, and the derivatives above
are exact for that loss. The running statistics (buffers updated in place by the forward pass) then differ
from rank to rank: the tuner averages them (all-reduce / N) or broadcasts rank 0's before evaluating or
saving, and :func:`check_replicas` must not be asked about them in between. torch's ``SyncBatchNorm`` (global
statistics) cannot be differentiated twice: the backward of its autograd Function
(``torch.nn.modules._functions.SyncBatchNorm``, torch 2.13) calls ``torch.batch_norm_backward_reduce`` and
``torch.batch_norm_backward_elemt``, which have no derivative formulas, and an all-reduce that autograd does not
record (and it runs on accelerators only: on a CPU its forward raises). :func:`unwrap` therefore replaces every
``SyncBatchNorm``, in place, by a :class:`GlobalBatchNorm` (:func:`convert_sync_batchnorm`) that takes over its
parameters and buffers: batch normalisation written with local differentiable operations and the two linear maps
above. Per channel, each rank's count, sum and sum of squares (2C + 1 numbers for C channels) go through
``_Copy(_Reduce(.))`` = f(g(.)): g sums them into the replicated global statistics, and f, because rank-local
computation reads those (g alone would leave each rank's cotangent of them rank-local: f's backward sums them
over the ranks, as the weights' f does); every rank normalises its own shard with the global mean and biased
variance, and updates the running statistics with the global mean and unbiased variance, so the loss is exactly
that of the global batch in one process, its derivatives of every order too, and the running statistics stay
replicated. Each such layer adds, per training-mode forward, one all-reduce of 2C + 1 numbers, and one more per
backward pass through it (a gradient: 1; a Hessian-vector product, which runs back through the forward and the
gradient: 2); eval mode uses the running statistics and communicates nothing. Under a ``torch.func`` transform
(``backend="func"``), torch refuses GlobalBatchNorm's in-place update of captured running statistics (plain
``F.batch_norm`` updates them inside its kernel): use the default autograd backend, or
``track_running_stats=False``.

**Identity.** When ``torch.distributed`` is not available, not initialised, or the group has one rank,
:func:`data_parallel_loss` returns the loss itself (no wrapping: the one-process path is bit for bit
unchanged), :func:`check_replicas` returns at once, and :func:`world_size` is 1. The decision is taken when
the loss is wrapped: wrap after ``torch.distributed.init_process_group``.

**Replicas.** The all-reduces of gloo and NCCL give every rank the same bits (each element is reduced once,
then shared: ring and tree algorithms), and the rest is the same deterministic computation on the same
inputs, so weights and hyperparameters stay bitwise identical across ranks.
:func:`check_replicas` verifies it cheaply (two small all-gathers of 64-bit checksums of the raw bytes).
The solvers' random vectors (:func:`bilevel.solvers.power_iteration`, CG's symmetry check) come from a
fresh CPU ``torch.Generator`` with a fixed seed, so every rank draws the same ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "data_parallel_loss",
    "check_replicas",
    "is_data_parallel",
    "world_size",
    "any_rank",
    "unwrap",
    "refuse_fsdp",
    "GlobalBatchNorm",
    "convert_sync_batchnorm",
]

_F = TypeVar("_F", bound=Callable[..., Tensor])  # loss(params, hparams, batch) -> () or (P,)
_CHUNK = 1 << 22  # int64 elements per chunk of a checksum (32 MB of temporaries)


def _initialised() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (1 when ``torch.distributed`` is not initialised).

    Args:
        group: a process group (``None``: the default group, all ranks).

    Returns:
        ``torch.distributed.get_world_size(group)``, or 1 without an initialised process group.
    """
    return int(torch.distributed.get_world_size(group)) if _initialised() else 1


def is_data_parallel(group: Any = None) -> bool:
    """Whether losses are to be made global: ``torch.distributed`` is initialised with more than one rank.

    Args:
        group: a process group (``None``: the default group).

    Returns:
        ``world_size(group) > 1``.
    """
    return world_size(group) > 1


# ---------------------------------------------------------------------------------------------- the collectives


def _all_reduce(tensors: Sequence[Tensor], group: Any) -> tuple[Tensor, ...]:
    """The all-reduce SUM of ``tensors``: one ``torch.distributed.all_reduce`` per (dtype, device) bucket.

    Each bucket is flattened into one new vector (the inputs are not modified), reduced in place and split back
    into views of the caller's shapes.
    """
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    out: list[Tensor | None] = [None] * len(tensors)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view(tensors[i].shape)
    return tuple(t for t in out if t is not None)


class _Reduce(torch.autograd.Function):
    """``g``: rank-local tensors -> their all-reduce SUM (replicated). Backward: the identity (``_Copy``)."""

    @staticmethod
    def forward(group: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
        return _all_reduce(tensors, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        return (None, *_Copy.apply(ctx.group, *grads))


class _Copy(torch.autograd.Function):
    """``f``: replicated tensors -> the same values for rank-local use. Backward: all-reduce SUM (``_Reduce``)."""

    @staticmethod
    def forward(group: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        return (None, *_Reduce.apply(ctx.group, *grads))


def _leaves(tree: Any, out: list[Tensor]) -> None:
    if isinstance(tree, Tensor):
        out.append(tree)
    elif isinstance(tree, Mapping):
        for v in tree.values():
            _leaves(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _leaves(v, out)


def _rebuild(tree: Any, new: dict[int, Tensor]) -> Any:
    if isinstance(tree, Tensor):
        return new.get(id(tree), tree)
    if isinstance(tree, Mapping):
        return {k: _rebuild(v, new) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a named tuple
        return type(tree)(*(_rebuild(v, new) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(v, new) for v in tree)
    return tree


def _copy_in(tree: Any, group: Any) -> Any:
    """``tree`` with every tensor that requires grad passed through ``_Copy`` (all of them in one call: one bucket).

    Mappings (nested too) become dicts, lists and tuples keep their types; tensors that need no gradient and
    non-tensors are kept as they are. Without grad mode, or with nothing requiring grad, ``tree`` itself.
    """
    if not torch.is_grad_enabled():
        return tree
    found: list[Tensor] = []
    _leaves(tree, found)
    todo = list({id(t): t for t in found if t.requires_grad}.values())  # each tensor once
    if not todo:
        return tree
    copies = _Copy.apply(group, *todo)
    return _rebuild(tree, {id(t): c for t, c in zip(todo, copies)})


def data_parallel_loss(loss: _F, group: Any = None) -> _F:
    """``loss`` as the global mean over the ranks' shards, whose derivatives of every order are global.

    The wrapped function evaluates ``loss(params, hparams, batch)`` on this rank's shard and returns
    ``(1/N) sum_r loss_r``, the same on every rank. Every tensor in ``params`` and in ``hparams`` (a dict,
    possibly nested, of tensors and other values) that requires grad passes through ``_Copy`` first (one
    bucket each for the weights and for the hyperparameters), so every gradient with respect to them, and
    every derivative of those gradients, is summed over the ranks in backward: one all-reduce per backward
    pass for the weights, and one for the hyperparameters when the loss reads them (see the module docstring
    for the maths and the counts). The shards must have equal sizes (``DistributedSampler(drop_last=True)``
    or its padding, and ``DataLoader(drop_last=True)``).

    Args:
        loss: ``loss(params, hparams, batch)`` returning a scalar (or shape (P,) for a stacked population),
            the mean over ``batch``.
        group: the process group the ranks form (``None``: the default group).

    Returns:
        The wrapped loss, or ``loss`` itself (the same object) when ``torch.distributed`` is not
        initialised, the group has one rank, or ``loss`` is wrapped already. Mappings in ``params`` and
        ``hparams`` reach ``loss`` as dicts.
    """
    if not is_data_parallel(group) or getattr(loss, "data_parallel", False):
        return loss  # one rank, or wrapped already
    n = world_size(group)

    @functools.wraps(loss)
    def wrapped(params: Any, hparams: Any, batch: Any) -> Tensor:
        value = loss(_copy_in(params, group), _copy_in(hparams, group), batch)
        if not isinstance(value, Tensor):
            raise TypeError(f"the loss must return a tensor, got {type(value).__name__}")
        (total,) = _Reduce.apply(group, value / n)
        return total

    wrapped.data_parallel = True  # type: ignore[attr-defined]
    return wrapped  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- checks


def _checksum(t: Tensor) -> Tensor:
    """(number of bytes, wrapping sum of the 64-bit words, wrapping sum of word * (2 * position + 1)), int64.

    Integer sums modulo 2^64 do not depend on the order of summation, so the checksum is deterministic; any
    single differing word changes the first sum, a permutation the second.
    """
    b = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    nbytes = b.numel()
    pad = (-nbytes) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    words = b.view(torch.int64)
    s1 = torch.zeros((), dtype=torch.int64, device=t.device)
    s2 = torch.zeros((), dtype=torch.int64, device=t.device)
    odd = 2 * torch.arange(min(words.numel(), _CHUNK), dtype=torch.int64, device=t.device) + 1
    for j, chunk in enumerate(words.split(_CHUNK)):
        s = chunk.sum()
        s1 += s
        s2 += (chunk * odd[: chunk.numel()]).sum() + s * (2 * j * _CHUNK)
    return torch.stack([torch.tensor(nbytes, dtype=torch.int64, device=t.device), s1, s2])


def _comm_device(group: Any) -> torch.device:
    backend = str(torch.distributed.get_backend(group))
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(x: Tensor, group: Any) -> list[Tensor]:
    out = [torch.empty_like(x) for _ in range(world_size(group))]
    torch.distributed.all_gather(out, x, group=group)
    return out


def check_replicas(tensors: Mapping[str, Tensor] | Sequence[Tensor], what: str, group: Any = None) -> None:
    """Check that every rank holds bitwise-identical ``tensors`` (a no-op without data parallelism).

    Each rank computes three 64-bit integers per tensor from its raw bytes (size, a wrapping sum of its
    64-bit words, and a position-weighted one) and the ranks all-gather them: two small collectives (the
    number of tensors, then the checksums), whatever the tensors' sizes. Every rank must call it with the
    same number of tensors; all ranks raise the same error.

    Args:
        tensors: ``{name: tensor}`` or a sequence of tensors (named ``[i]``) of any dtypes.
        what: what the tensors are, for the message (e.g. ``"hyperparameters after step 20"``).
        group: the process group (``None``: the default group).

    Raises:
        RuntimeError: the ranks hold different numbers of tensors, or some tensor differs; the message names
            ``what``, the first differing tensor and the ranks.
    """
    if not is_data_parallel(group):
        return
    items = list(tensors.items()) if isinstance(tensors, Mapping) else [(f"[{i}]", t) for i, t in enumerate(tensors)]
    device = _comm_device(group)
    counts = _all_gather(torch.tensor([len(items)], dtype=torch.int64, device=device), group)
    if len({int(c) for c in counts}) > 1:
        raise RuntimeError(
            f"{what}: the ranks hold different numbers of tensors ({[int(c) for c in counts]}): not replicas"
        )
    if not items:
        return
    local = torch.stack([_checksum(t).to(device) for _, t in items])
    sums = [s.cpu() for s in _all_gather(local, group)]
    for i, (name, _) in enumerate(items):
        for rank in range(1, len(sums)):
            if not torch.equal(sums[rank][i], sums[0][i]):
                raise RuntimeError(
                    f"{what}: {name!r} differs between rank 0 and rank {rank} (the replicas must be bitwise "
                    "identical: the same initial values on every rank, e.g. broadcast from rank 0, the same "
                    "seeds, and global losses (bilevel.distributed.data_parallel_loss) for every derivative)"
                )


# ---------------------------------------------------------------------------------------------- models


def _fsdp_types() -> tuple[type, ...]:
    if not torch.distributed.is_available():
        return ()
    types: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - every torch with torch.distributed has it
        pass
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard), torch >= 2.6
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            FSDPModule = None  # type: ignore[assignment,misc]
    if FSDPModule is not None:
        types.append(FSDPModule)
    return tuple(types)


def refuse_fsdp(model: object) -> None:
    """Raise ``ValueError`` if ``model`` or any of its submodules is FSDP-wrapped (FSDP1 or FSDP2).

    Args:
        model: a module (anything else passes).

    Raises:
        ValueError: an ``FullyShardedDataParallel`` or ``FSDPModule`` (``fully_shard``) is found; the message
            names it and says why: second-order gradients are not supported by FSDP.
    """
    if not isinstance(model, nn.Module):
        return
    types = _fsdp_types()
    if not types:
        return
    for name, m in model.named_modules():
        if isinstance(m, types):
            where = f"submodule {name!r}" if name else "the model"
            raise ValueError(
                f"{where} is FSDP-sharded ({type(m).__name__}): second-order gradients are not supported by FSDP "
                "(its parameter gathers and gradient reduce-scatters are hooks that double backward does not see); "
                "use DistributedDataParallel or no wrapper: bilevel replicates the weights on every rank"
            )


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch (all ranks' shards together), differentiable to every order.

    A drop-in for :class:`torch.nn.SyncBatchNorm` (the same constructor, parameters ``weight`` and ``bias``,
    buffers ``running_mean``, ``running_var`` and ``num_batches_tracked``, and state-dict keys) whose derivatives
    of every order are those of batch normalisation on the global batch. In training mode, per channel c, each
    rank computes its local count n_r, sum s_r and sum of squares q_r (from its shard's centred moments, in float64:
    the 2C + 1 numbers are few), one all-reduce sums them (``_Copy(_Reduce(.))``: the forward all-reduce, and in
    backward one all-reduce of their cotangents, every order), and every rank normalises its own shard with the
    global mean ``m = s / n`` and biased variance ``v = q / n - m^2``:

        ``y = (x - m) / sqrt(v + eps) * weight + bias``.

    The running statistics are updated as torch's BatchNorm updates them, with the global mean and the unbiased
    global variance ``v * n / (n - 1)`` (``momentum``, or the cumulative average when ``momentum=None``, counted by
    ``num_batches_tracked``), so they are the same on every rank. In eval mode, and without data parallelism
    (:func:`is_data_parallel` of ``process_group`` false: one process), the forward is ``F.batch_norm`` exactly as
    in ``nn.BatchNorm``: no collective (as torch's SyncBatchNorm, statistics are not synchronised in eval mode, so
    an evaluation may run on one rank only). Inputs are ``(N, C)`` or ``(N, C, *)`` (1-d, 2-d, 3-d batch norm
    alike); the shards may have different sizes. Works under ``torch.func.functional_call`` with parameters and buffers
    swapped in (the running statistics are updated in place in the tensors passed).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability.
        momentum: the running statistics' update factor; ``None``: the cumulative moving average.
        affine: whether the layer has a learnable ``weight`` and ``bias``.
        track_running_stats: whether the layer keeps running statistics (else batch statistics in eval mode too,
            each rank's own).
        process_group: the ranks whose shards form the global batch (``None``: the default group).
        device: the parameters' and buffers' device.
        dtype: the parameters' and buffers' dtype.
        bias: whether an affine layer has a ``bias``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (dimension 1), got input of shape {input.shape}")

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with the global batch statistics (training mode) or the running ones (eval mode).

        Args:
            input: this rank's shard, shape ``(N, C)`` or ``(N, C, *)``.

        Returns:
            The normalised shard, the shape and dtype of ``input``.
        """
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        if not (self.training and is_data_parallel(self.process_group)):
            bn_training = self.training or (self.running_mean is None and self.running_var is None)
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps)
        return _global_batch_norm(
            input, self.weight, self.bias, running_mean, running_var, factor, self.eps, self.process_group
        )


def _global_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    factor: float,
    eps: float,
    group: Any,
) -> Tensor:
    """Training-mode batch norm of the local shard ``x`` with the statistics of all ranks' shards (one all-reduce).

    The local moments are centred on the shard's own mean (at least float32: no overflow or cancellation for half
    precision inputs), turned into the sum and the sum of squares in float64 and all-reduced with the count: 2C + 1
    numbers, ``_Copy(_Reduce(.))`` so that each rank's cotangent of the global statistics is summed over the ranks
    in backward. The output is computed in ``x``'s dtype.
    """
    c = x.size(1)
    dims = [0, *range(2, x.dim())]
    shape = [1, c] + [1] * (x.dim() - 2)
    count = x.numel() // c if c else 0
    acc = torch.float64
    xs = x.to(torch.promote_types(x.dtype, torch.float32))  # x itself for float32 and float64
    local_mean = xs.mean(dims) if count else xs.sum(dims)  # an empty shard contributes zeros
    m2 = (xs - local_mean.view(shape)).square().sum(dims).to(acc)
    local_mean = local_mean.to(acc)
    local = torch.cat([count * local_mean, m2 + count * local_mean.square(), local_mean.new_full((1,), count)])
    (total,) = _Copy.apply(group, *_Reduce.apply(group, local))
    n = total[2 * c]
    mean = total[:c] / n
    var = (total[c : 2 * c] / n - mean.square()).clamp(min=0.0)
    scale = torch.rsqrt(var + eps).to(x.dtype)
    if weight is not None:
        scale = scale * weight.to(x.dtype)
    y = (x - mean.to(x.dtype).view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(x.dtype).view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = var * (n / (n - 1))
            running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return y


def _take_over(old: nn.SyncBatchNorm) -> GlobalBatchNorm:
    """A :class:`GlobalBatchNorm` holding ``old``'s very Parameter and buffer objects (and its settings)."""
    new = GlobalBatchNorm(
        old.num_features,
        old.eps,
        old.momentum,
        old.affine,
        old.track_running_stats,
        old.process_group,
        device="meta",  # placeholders, replaced below: nothing is allocated
        bias=old.bias is not None,
    )
    new._parameters.clear()
    new._parameters.update(old._parameters)  # the same objects, in the same order: the optimiser keeps them
    new._buffers.clear()
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new._modules.update(old._modules)
    new.training = old.training
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` in ``model``, in place, by a :class:`GlobalBatchNorm` (double backward).

    Each replacement takes over the very Parameter and buffer objects of the layer it replaces (an optimiser
    that holds them keeps working, and ``state_dict`` keys are unchanged), its settings (``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, ``process_group``) and its train/eval mode; a layer registered under
    several names becomes one GlobalBatchNorm. Plain ``BatchNorm`` layers are kept (per-rank statistics): convert
    them first with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for global statistics. Converting twice is
    converting once.

    Args:
        model: a module, possibly a ``DistributedDataParallel`` wrapper.

    Returns:
        ``model`` itself, converted; a new :class:`GlobalBatchNorm` when ``model`` is itself a SyncBatchNorm.
    """
    memo: dict[int, GlobalBatchNorm] = {}

    def replacement(m: nn.SyncBatchNorm) -> GlobalBatchNorm:
        if id(m) not in memo:
            memo[id(m)] = _take_over(m)
        return memo[id(m)]

    if isinstance(model, nn.SyncBatchNorm):
        model = replacement(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, nn.SyncBatchNorm):
                parent._modules[name] = replacement(child)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module a tuner evaluates: ``model.module`` for a ``DistributedDataParallel`` model, else ``model``.

    DDP's gradient hooks are bypassed this way; :func:`data_parallel_loss` sums the gradients instead. Every
    ``nn.SyncBatchNorm`` (no double backward) is replaced in place by a :class:`GlobalBatchNorm` holding the same
    parameters and buffers (:func:`convert_sync_batchnorm`). FSDP (:func:`refuse_fsdp`) is refused.

    Args:
        model: a module, possibly wrapped in ``torch.nn.parallel.DistributedDataParallel``.

    Returns:
        The inner module (``model`` itself when it is not DDP-wrapped), its SyncBatchNorm layers converted (a new
        :class:`GlobalBatchNorm` when the inner module is itself a SyncBatchNorm).

    Raises:
        ValueError: ``model`` is FSDP-sharded (:func:`refuse_fsdp`).
    """
    refuse_fsdp(model)
    model = convert_sync_batchnorm(model)
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            inner = model.module
            assert isinstance(inner, nn.Module)
            return inner
    return model


def any_rank(flag: bool, group: Any = None) -> bool:
    """Whether ``flag`` holds on any rank (an all-reduce MAX of one number; ``flag`` itself on one process).

    Every rank must call it. The online loop uses it for the one branch that depends on a rank's own data
    (whether a non-finite value came from the data), so that every rank takes the same branch.

    Args:
        flag: this rank's flag.
        group: the process group (``None``: the default group).

    Returns:
        The flag's maximum over the ranks.
    """
    if not is_data_parallel(group):
        return flag
    x = torch.tensor([1.0 if flag else 0.0], device=_comm_device(group))
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(x.item() > 0)
