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

**Modules.** One per idea; every name is re-exported here, so ``bilevel.distributed.X`` is the public name
of each: :mod:`bilevel.distributed.ranks` (:func:`world_size`, :func:`is_data_parallel`, :func:`any_rank`),
:mod:`bilevel.distributed.collectives` (``_Copy``, ``_Reduce`` and :func:`data_parallel_loss`),
:mod:`bilevel.distributed.replicas` (:func:`check_replicas`), :mod:`bilevel.distributed.batchnorm`
(:class:`GlobalBatchNorm`, :func:`convert_sync_batchnorm`) and :mod:`bilevel.distributed.wrappers`
(:func:`refuse_fsdp`, :func:`unwrap`).
"""

from .batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from .collectives import _Copy as _Copy  # the two linear maps, by the names the tests use
from .collectives import _Reduce as _Reduce
from .collectives import data_parallel_loss
from .ranks import any_rank, is_data_parallel, world_size
from .replicas import check_replicas
from .wrappers import refuse_fsdp, unwrap

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
