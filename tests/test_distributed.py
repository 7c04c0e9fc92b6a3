"""Data-parallel global losses (bilevel.distributed) on 2 CPU ranks (gloo) against one process with the whole batch.

Every distributed test starts two processes (``torch.multiprocessing``, start method "forkserver": the server
imports torch and bilevel once per session, each rank is forked from it) that form a gloo group on 127.0.0.1
and run one worker function of this module; a worker's failed assertion fails the test with its traceback.
Each rank takes its half of every global batch, as ``DistributedSampler`` gives it.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bilevel
from bilevel import distributed as bd
from bilevel import hparams as H
from bilevel import updates
from bilevel.regularizers import PerWeightDecay
from bilevel.tuner import OnlineTuner, TunerConfig

D = torch.float64
RANKS = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# ---------------------------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., None], port: int, args: tuple[Any, ...]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=timedelta(seconds=30))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


# imported once by the fork server (a fresh process: no thread pool has run in it), not by every rank
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch.distributed.fsdp", "bilevel", "pytest"]


def spawn(fn: Callable[..., None], *args: Any, timeout: float = 60.0) -> None:
    """Run ``fn(rank, *args)`` on 2 gloo ranks; re-raise a rank's exception, kill both after ``timeout``."""
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)  # no effect once the server runs
    ctx = mp.start_processes(_entry, args=(fn, _free_port(), args), nprocs=RANKS, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout} s on {RANKS} ranks (a collective hung?)")


class AllReduceCounter:
    """Wraps ``torch.distributed.all_reduce`` and records the size of every call, by phase."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.phase = "setup"
        self._orig = dist.all_reduce

    def __enter__(self) -> AllReduceCounter:
        def counted(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.calls.append((self.phase, tensor.numel()))
            return self._orig(tensor, *a, **k)

        dist.all_reduce = counted  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._orig

    def take(self) -> list[int]:
        """The sizes recorded since the last ``take``."""
        out = [n for _, n in self.calls]
        self.calls = []
        return out


def shard(batch: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous half of every tensor of a global batch (equal shards)."""
    return tuple(x.chunk(RANKS)[rank] for x in batch)


# ---------------------------------------------------------------------------------------------- the model


def make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W1": torch.randn(8, 3, generator=g, dtype=D) / 2,
        "b1": 0.1 * torch.randn(8, generator=g, dtype=D),
        "W2": torch.randn(1, 8, generator=g, dtype=D) / 8**0.5,
    }


def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T


def mse(p: dict[str, torch.Tensor], h: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((forward(p, x) - y) ** 2).mean()


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=D)
    return x, y


def penalised(p: dict[str, torch.Tensor], h: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error plus a per-weight L2 penalty (the hyperparameters ``h["decay"]``, nested) on W1 and W2."""
    return mse(p, h, batch) + 0.5 * sum((h["decay"][k] * p[k] ** 2).sum() for k in h["decay"])


# ---------------------------------------------------------------------------------------------- 1. derivatives


def _derivatives(loss: Callable[..., torch.Tensor], batch: Any, counter: AllReduceCounter | None) -> dict[str, Any]:
    """Value, gradient, Hessian-vector product, mixed second and a third derivative of ``loss``; sizes per pass."""
    p = {k: v.requires_grad_() for k, v in make_params(1).items()}
    decay = {"W1": torch.full((8, 3), 0.01, dtype=D), "W2": torch.linspace(0.01, 0.1, 8, dtype=D).reshape(1, 8)}
    decay = {k: v.requires_grad_() for k, v in decay.items()}
    h = {"decay": decay, "note": "not a tensor", "fixed": torch.ones(())}
    gen = torch.Generator().manual_seed(5)
    v = {k: torch.randn(t.shape, generator=gen, dtype=D) for k, t in p.items()}
    u = {k: torch.randn(t.shape, generator=gen, dtype=D) for k, t in p.items()}
    sizes: dict[str, list[int]] = {}

    def mark(name: str) -> None:
        if counter is not None:
            sizes[name] = counter.take()

    value = loss(p, h, batch)
    mark("forward")
    g = torch.autograd.grad(value, list(p.values()), create_graph=True)
    mark("gradient")
    gv = sum((gi * v[k]).sum() for gi, k in zip(g, p))
    hvp = torch.autograd.grad(gv, list(p.values()), create_graph=True, retain_graph=True)
    mark("hessian-vector product")
    mixed = torch.autograd.grad(gv, list(decay.values()), retain_graph=True)
    mark("mixed product")
    third = torch.autograd.grad(sum((hi * u[k]).sum() for hi, k in zip(hvp, p)), list(p.values()))
    mark("third derivative")
    direct = torch.autograd.grad(loss(p, h, batch), list(decay.values()))
    mark("forward + hyperparameter gradient")
    return {
        "value": value.detach(),
        "gradient": [x.detach() for x in g],
        "hvp": [x.detach() for x in hvp],
        "mixed": list(mixed),
        "third": list(third),
        "direct": list(direct),
        "sizes": sizes,
    }


def _derivatives_worker(rank: int, out: str) -> None:
    batch = data(16, seed=3)
    ref = _derivatives(penalised, batch, None)  # one process, the whole batch (no collective: not wrapped)
    wrapped = bd.data_parallel_loss(penalised)
    assert wrapped is not penalised and bd.is_data_parallel() and bd.world_size() == RANKS
    with AllReduceCounter() as counter:
        got = _derivatives(wrapped, shard(batch, rank), counter)
    for key in ("value", "gradient", "hvp", "mixed", "third", "direct"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-12, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")
    n_weights, n_decay = 8 * 3 + 8 + 8, 8 * 3 + 8
    assert got["sizes"] == {
        "forward": [1],
        "gradient": [n_weights],  # ONE all-reduce for all the weights
        "hessian-vector product": [n_weights],
        "mixed product": [n_decay],  # one for the hyperparameters the loss reads
        "third derivative": [n_weights],
        "forward + hyperparameter gradient": [1, n_decay],
    }, got["sizes"]
    bd.check_replicas({"value": got["value"], **{f"hvp{i}": x for i, x in enumerate(got["hvp"])}}, "derivatives")
    if rank == 0:
        Path(out).write_text(json.dumps(got["sizes"]))


def test_global_derivatives_of_every_order_equal_one_process(tmp_path: Path) -> None:
    """Value, gradient, Hessian-vector product (double backward), mixed d2L/dw dlambda and a third derivative of the
    wrapped loss on 2 ranks with half of a 16-example batch each equal the one-process full-batch ones to 1e-12, on
    both ranks; every backward pass does one all-reduce (the weights' bucket, or the hyperparameters')."""
    spawn(_derivatives_worker, str(tmp_path / "sizes.json"))
    assert json.loads((tmp_path / "sizes.json").read_text())["gradient"] == [40]


# ---------------------------------------------------------------------------------------------- 2. the online loop

TRAIN = data(64, seed=11)  # 4 global minibatches of 16
VAL = data(32, seed=12)  # 2 global validation batches of 16


def _batches(full: tuple[torch.Tensor, ...], size: int, rank: int | None) -> Callable[[], Any]:
    """Cycle through the global minibatches of ``size`` of ``full``; a rank takes its half of each."""
    state = {"i": 0}
    n = full[0].shape[0] // size

    def nxt() -> Any:
        i = state["i"] % n
        state["i"] += 1
        batch = tuple(x[i * size : (i + 1) * size] for x in full)
        return batch if rank is None else shard(batch, rank)

    return nxt


def _tuner(form: str, solver: str, distributed: bool) -> OnlineTuner:
    params = make_params(0)
    train_loss = val_loss = bd.data_parallel_loss(mse) if distributed else mse
    # "alpha1": Clarke et al.'s Neumann(3, alpha=1) (no power iteration); "auto": AutoNeumann(3), one model's default
    sol = bilevel.AutoNeumann(3) if solver == "auto" else bilevel.Neumann(3, alpha=1.0, divergence="ignore")
    if form == "update":
        space = H.HyperParameterSpace([H.learning_rate(), H.weight_decay(), H.momentum()])
        raw = space.from_natural(params, {"lr": 0.05, "weight_decay": 1e-3, "momentum": 0.5})
        tuned = ("lr", "momentum", "weight_decay")
        config = TunerConfig(tuned=tuned, interval=5, lookback=3, solver=sol)
        return OnlineTuner(
            params, raw, space, updates.SGD(), train_loss, val_loss, update_form=tuned, config=config, stacked=False
        )
    pen = PerWeightDecay(params, init=1e-3)  # penalty(params, natural) = 1/2 sum l2 * w^2, one decay per weight
    space = H.HyperParameterSpace([H.learning_rate(), H.momentum(), *pen.hyperparameters])
    raw = space.from_natural(params, {"lr": 0.05, "momentum": 0.5, **pen.initial()})
    config = TunerConfig(tuned=("l2",), interval=5, lookback=3, implicit="loss", solver=sol)
    return OnlineTuner(
        params,
        raw,
        space,
        updates.SGD(),
        train_loss,
        val_loss,
        update_form=("lr", "momentum"),
        penalty=pen,  # replicated on every rank: not wrapped
        config=config,
        stacked=False,
    )


def _loop_worker(rank: int, form: str, out: str) -> None:
    report: dict[str, Any] = {}
    n_weights = 8 * 3 + 8 + 8
    for solver in ("alpha1", "auto"):
        ref = _tuner(form, solver, distributed=False)
        ref.run(100, _batches(TRAIN, 16, None), _batches(VAL, 16, None))
        dp = _tuner(form, solver, distributed=True)
        with AllReduceCounter() as counter:
            train, val = _batches(TRAIN, 16, rank), _batches(VAL, 16, rank)

            def train_batches(train: Callable[[], Any] = train) -> Any:
                counter.phase = f"weight step {dp.t + 1}"  # run() asks for the batch first
                return train()

            def val_batches(val: Callable[[], Any] = val) -> Any:
                counter.phase = f"hyper step {dp.t // 5}"  # ... and for the validation batch just before hyper_step
                return val()

            dp.run(100, train_batches, val_batches)
        per_phase: dict[str, list[int]] = {}
        for phase, n in counter.calls:
            per_phase.setdefault(phase, []).append(n)
        weight = [v for k, v in per_phase.items() if k.startswith("weight")]
        hyper = [v for k, v in per_phase.items() if k.startswith("hyper")]
        assert len(weight) == 100 and all(v == [1, n_weights] for v in weight), weight[:3]
        assert len(hyper) == 20
        # IFT with Neumann(3): training gradient + validation gradient + 3 products, each one bucket of the weights,
        # and the two loss values; AutoNeumann adds its power iteration (20 products) when it estimates its step
        steady = [1, n_weights, 1, n_weights, n_weights, n_weights, n_weights]
        if solver == "alpha1":
            assert all(v == steady for v in hyper), hyper[:2]
        else:
            assert hyper[0] == [1, n_weights, 1, n_weights] + [n_weights] * (20 + 3), hyper[0]
            assert all(v == steady for v in hyper[1:]), hyper[1:]  # the step is kept (no re-estimate here)
        rel = max(
            float(((a.detach() - b.detach()).abs() / b.detach().abs().clamp(min=1e-300)).max())
            for a, b in [
                *((dp.raw[k], ref.raw[k]) for k in ref.raw),
                *((dp.params[k], ref.params[k]) for k in ref.params),
            ]
        )
        report[solver] = {"weight step": weight[0], "hyper steps": hyper, "total": len(counter.calls), "rel": rel}
        for k in ref.raw:
            torch.testing.assert_close(dp.raw[k].detach(), ref.raw[k].detach(), rtol=1e-8, atol=1e-14)
        for k in ref.params:
            torch.testing.assert_close(dp.params[k], ref.params[k], rtol=1e-8, atol=1e-14)
        moved = max(float((dp.raw[k] - _tuner(form, solver, False).raw[k]).detach().abs().max()) for k in dp.tuned_keys)
        assert moved > 1e-3, "the hyperparameters did not move: the comparison would be vacuous"
        bd.check_replicas({k: v.detach() for k, v in dp.raw.items()}, f"{form} {solver}: hyperparameters")
        bd.check_replicas(dp.params, f"{form} {solver}: weights")
        bd.check_replicas([s for s in dp.state.values() if isinstance(s, torch.Tensor)], "optimiser state")
    if rank == 0:
        Path(out).write_text(json.dumps(report))


@pytest.mark.parametrize("form", ["update", "loss"])
def test_online_loop_on_two_ranks_follows_one_process(form: str, tmp_path: Path) -> None:
    """OnlineTuner, 100 weight steps and 20 IFT hyperparameter steps, with the wrapped losses on 2 ranks each taking
    half of every minibatch, follows the one-process run on the global minibatches (raw hyperparameters and weights
    to 1e-8 relative) and keeps the ranks' hyperparameters, weights and optimiser state bitwise identical; the default
    solver and AutoNeumann(3). ``form="update"``: SGD's lr, momentum and weight decay tuned (Clarke et al.);
    ``form="loss"``: a per-weight L2 penalty (``penalty=``, implicit="loss", Lorraine et al.)."""
    spawn(_loop_worker, form, str(tmp_path / "counts.json"))
    report = json.loads((tmp_path / "counts.json").read_text())
    assert report["alpha1"]["weight step"] == [1, 40]


# ---------------------------------------------------------------------------------------------- 3. checks, refusals


def _checks_worker(rank: int) -> None:
    same = {"a": torch.arange(5, dtype=D), "b": torch.ones(2, 3, dtype=torch.float32), "n": torch.tensor(7)}
    bd.check_replicas(same, "identical tensors")
    bd.check_replicas(list(same.values()), "identical tensors")
    bd.check_replicas({}, "nothing")
    differ = dict(same, b=same["b"] + (torch.finfo(torch.float32).eps if rank == 1 else 0.0))  # one ulp on rank 1
    with pytest.raises(RuntimeError, match=r"hyperparameters at step 3: 'b' differs between rank 0 and rank 1"):
        bd.check_replicas(differ, "hyperparameters at step 3")
    swapped = {"a": torch.tensor([1.0, 2.0], dtype=D) if rank == 0 else torch.tensor([2.0, 1.0], dtype=D)}
    with pytest.raises(RuntimeError, match="'a' differs"):
        bd.check_replicas(swapped, "a permutation")
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        bd.check_replicas([same["a"], differ["b"]], "a sequence")
    with pytest.raises(RuntimeError, match="different numbers of tensors"):
        bd.check_replicas(list(same.values())[: 2 + rank], "counts")
    # DDP: the tuner evaluates the inner module
    net = nn.Linear(3, 1).double()
    ddp = nn.parallel.DistributedDataParallel(net)
    assert bd.unwrap(ddp) is net and bd.unwrap(net) is net
    # FSDP2 (fully_shard, on a CPU device mesh) is refused, naming the sharded submodule
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    fully_shard(model[0], mesh=init_device_mesh("cpu", (RANKS,)))
    with pytest.raises(ValueError, match="submodule '0' is FSDP-sharded.*second-order gradients are not supported"):
        bd.unwrap(model)
    # SyncBatchNorm (no double backward): converted in place to GlobalBatchNorm, inside DDP too
    seq = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4)).double()
    assert bd.unwrap(seq) is seq and type(seq[1]) is bd.GlobalBatchNorm
    inner = nn.Sequential(nn.Linear(3, 4)).double()
    ddp = nn.parallel.DistributedDataParallel(inner)
    inner.append(nn.SyncBatchNorm(4).double())  # added after wrapping: DDP refuses SyncBatchNorm on a CPU
    assert bd.unwrap(ddp) is inner and type(inner[1]) is bd.GlobalBatchNorm
    # wrapping twice is wrapping once
    wrapped = bd.data_parallel_loss(mse)
    assert bd.data_parallel_loss(wrapped) is wrapped


def test_check_replicas_unwrap_and_refusals_on_two_ranks() -> None:
    """check_replicas passes on identical tensors and raises on every rank, naming what and which tensor, for one
    differing ulp, a permutation, or different numbers of tensors; DDP is unwrapped, FSDP2 refused, SyncBatchNorm
    converted to GlobalBatchNorm."""
    spawn(_checks_worker)


def test_one_process_is_the_identity() -> None:
    """Without an initialised process group nothing is wrapped (the same object) and nothing is checked."""
    assert not dist.is_initialized()
    assert bd.world_size() == 1 and not bd.is_data_parallel()
    assert bd.data_parallel_loss(mse) is mse
    bd.check_replicas({"a": torch.ones(3)}, "one process")
    net = nn.Linear(2, 2)
    assert bd.unwrap(net) is net


def test_fsdp_refused_with_a_clear_message() -> None:
    """FSDP1 (FullyShardedDataParallel) and FSDP2 (FSDPModule, as fully_shard makes it) anywhere in a model."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    class FakeFSDP(FullyShardedDataParallel):  # an instance without a process group: only its type matters
        def __init__(self) -> None:
            nn.Module.__init__(self)

    with pytest.raises(ValueError, match=r"the model is FSDP-sharded \(FakeFSDP\): second-order gradients are not"):
        bd.refuse_fsdp(FakeFSDP())
    lin = nn.Linear(2, 2)
    lin.__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})  # what fully_shard does to a module
    with pytest.raises(ValueError, match="submodule 'inner' is FSDP-sharded"):
        bd.refuse_fsdp(nn.ModuleDict({"inner": lin}))
    with pytest.raises(ValueError, match="second-order gradients are not supported by FSDP"):
        bd.unwrap(nn.ModuleDict({"inner": lin}))
    bd.refuse_fsdp(nn.Linear(2, 2))
    bd.refuse_fsdp("not a module")


def test_collectives_are_a_conjugate_pair_in_one_process() -> None:
    """Sanity of the autograd wiring without communication: on a one-rank gloo group f and g are identities whose
    derivatives of every order are the identity's."""
    pytest.importorskip("torch.distributed")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        x = torch.randn(3, dtype=D, requires_grad=True)
        (y,) = bd._Copy.apply(None, x)
        (z,) = bd._Reduce.apply(None, (y**3).sum().reshape(1))
        (g,) = torch.autograd.grad(z.sum(), x, create_graph=True)
        torch.testing.assert_close(g, 3 * x**2)
        (h,) = torch.autograd.grad(g.sum(), x)
        torch.testing.assert_close(h, 6 * x.detach())
        assert bd.data_parallel_loss(mse) is mse  # one rank: the identity
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- 4. GlobalBatchNorm


def bn_nets(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    """A small conv net with plain BatchNorm (4-d, 3-d and 2-d inputs; momentum 0.3, None and 0.1; non-trivial affine
    parameters and running statistics), and a copy of it with SyncBatchNorm layers (separate tensors)."""
    torch.manual_seed(seed)
    plain = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3, momentum=0.3),  # (N, 3, 4, 4)
        nn.Tanh(),
        nn.Flatten(2),
        nn.BatchNorm1d(3, momentum=None),  # (N, 3, 16): the cumulative average
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 5),
        nn.BatchNorm1d(5),  # (N, 5)
        nn.Tanh(),
        nn.Linear(5, 1),
    ).to(D)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return plain, nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))


def bn_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 3.0 + 2.0 * torch.randn(n, 2, 4, 4, generator=g, dtype=D)  # a mean far from 0: the statistics matter
    return x, torch.randn(n, 1, generator=g, dtype=D)


def _bn_derivatives(model: nn.Module, batch: Any, wrap: bool, counter: AllReduceCounter | None) -> dict[str, Any]:
    """Value, gradient and Hessian-vector product of the training-mode loss of ``model`` through ``functional_call``
    (parameters and copies of the buffers swapped in), the buffers after that one forward, all-reduce sizes."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss(p: dict[str, torch.Tensor], h: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((torch.func.functional_call(model, {**p, **buffers}, (x,)) - y) ** 2).mean()

    fn = bd.data_parallel_loss(loss) if wrap else loss
    p = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    v = {k: torch.randn(t.shape, generator=gen, dtype=D) for k, t in p.items()}
    sizes: dict[str, list[int]] = {}

    def mark(name: str) -> None:
        if counter is not None:
            sizes[name] = sorted(counter.take())

    value = fn(p, None, batch)
    mark("forward")
    after = {k: b.clone() for k, b in buffers.items()}
    g = torch.autograd.grad(value, list(p.values()), create_graph=True)
    mark("gradient")
    hvp = torch.autograd.grad(sum((gi * v[k]).sum() for gi, k in zip(g, p)), list(p.values()))
    mark("hessian-vector product")
    return {"value": value.detach(), "gradient": [x.detach() for x in g], "hvp": list(hvp), "buffers": after} | {
        "sizes": sizes
    }


def _batchnorm_worker(rank: int) -> None:
    plain, sync = bn_nets()
    model = bd.convert_sync_batchnorm(sync)
    assert sum(type(m) is bd.GlobalBatchNorm for m in model.modules()) == 3
    batch = bn_data(16, seed=1)
    ref = _bn_derivatives(plain, batch, wrap=False, counter=None)  # one process, the whole batch, plain BatchNorm
    with AllReduceCounter() as counter:
        got = _bn_derivatives(model, shard(batch, rank), wrap=True, counter=counter)
    for key in ("value", "gradient", "hvp", "buffers"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")
    assert float(ref["hvp"][0].abs().max()) > 1e-3  # a non-trivial second derivative
    # one all-reduce of 2C + 1 per layer per forward (C = 3, 3, 5) and per backward pass (two in a double backward)
    n_weights = sum(t.numel() for t in plain.parameters())
    assert got["sizes"] == {
        "forward": [1, 7, 7, 11],
        "gradient": [7, 7, 11, n_weights],
        "hessian-vector product": [7, 7, 7, 7, 11, 11, n_weights],
    }, got["sizes"]
    # the layers' own buffers, two training-mode forwards (the cumulative average counts them); unequal shards
    x = bn_data(20, seed=2)[0]
    mine = x[:8] if rank == 0 else x[8:]
    for step in range(2):
        with AllReduceCounter() as counter:
            out = model(mine[: 7 + step] if rank == 0 else mine)  # 7 + 13 examples, then 8 + 12
        assert sorted(counter.take()) == [7, 7, 11]
        expect = plain(x if step else torch.cat([x[:7], x[8:]]))
        torch.testing.assert_close(out, expect[: 7 + step] if rank == 0 else expect[7 + step :], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dict(model.named_buffers()), dict(plain.named_buffers()), rtol=1e-10, atol=1e-10)
    assert int(model[4].num_batches_tracked) == 2
    bd.check_replicas(dict(model.named_buffers()), "GlobalBatchNorm running statistics")  # bitwise the same
    # eval mode: plain batch norm with the running statistics, no collective
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    with AllReduceCounter() as counter:
        out = model(mine)
    assert counter.take() == [] and torch.equal(out, plain(mine))


def test_global_batchnorm_on_two_ranks_equals_one_process() -> None:
    """SyncBatchNorm converted to GlobalBatchNorm, 2 ranks with half a 16-example batch each, against plain BatchNorm on
    the whole batch in one process (float64; 4-d, 3-d and 2-d inputs; momentum 0.3, None, 0.1): the wrapped loss,
    gradient, Hessian-vector product (double backward) and the running statistics after the forward agree to 1e-10;
    one all-reduce of 2C + 1 numbers per layer per forward and per backward pass; unequal shards (7 + 13) and the
    layers' own buffers over two forwards (cumulative average); eval mode is plain BatchNorm, with no collective."""
    spawn(_batchnorm_worker)


def test_convert_sync_batchnorm_takes_over_parameters_and_buffers() -> None:
    """convert_sync_batchnorm replaces every SyncBatchNorm in place by a GlobalBatchNorm holding the same Parameter and
    buffer objects (an optimiser keeps them), the same state_dict keys and train/eval mode; a shared layer becomes one;
    a SyncBatchNorm model is replaced; without a process group it is plain BatchNorm, bit for bit."""
    plain, model = bn_nets()
    model[8].eval()
    model.add_module("again", model[4])  # one layer under two names
    tensors = {k: id(v) for k, v in [*model.named_parameters(), *model.named_buffers()]}
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert bd.convert_sync_batchnorm(model) is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert [type(model[i]) for i in (1, 4, 8)] == [bd.GlobalBatchNorm] * 3 and model.again is model[4]
    assert {k: id(v) for k, v in [*model.named_parameters(), *model.named_buffers()]} == tensors
    assert list(model.state_dict()) == keys
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
    assert model[1].training and not model[8].training and model[4].momentum is None and model[1].momentum == 0.3
    assert bd.convert_sync_batchnorm(model) is model and model[1] is model[1]  # converting twice: once
    plain.add_module("again", plain[4])
    model.load_state_dict(plain.state_dict())  # strict: the same keys as plain BatchNorm
    # a SyncBatchNorm model; affine=False, bias=False, track_running_stats=False layers
    for layer in (
        nn.SyncBatchNorm(4),
        nn.SyncBatchNorm(4, affine=False),
        nn.SyncBatchNorm(4, bias=False),
        nn.SyncBatchNorm(4, track_running_stats=False),
    ):
        before = [(k, id(v)) for k, v in [*layer.named_parameters(), *layer.named_buffers()]]
        new = bd.convert_sync_batchnorm(layer)
        assert type(new) is bd.GlobalBatchNorm
        assert [(k, id(v)) for k, v in [*new.named_parameters(), *new.named_buffers()]] == before
        assert (new.bias is None) == (layer.bias is None) and new.extra_repr() == layer.extra_repr()
    # one process: nn.BatchNorm exactly, in train mode (running statistics too) and in eval mode
    plain, model = bn_nets()
    bd.convert_sync_batchnorm(model)
    x = bn_data(8, seed=4)[0]
    for mode in (True, False):
        plain.train(mode)
        model.train(mode)
        assert torch.equal(model(x), plain(x))
        for (k, a), b in zip(model.named_buffers(), plain.buffers()):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="expected 3 channels"):
        model[1](torch.ones(2, 4, 3, 3, dtype=D))
