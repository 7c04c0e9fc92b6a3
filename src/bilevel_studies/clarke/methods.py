"""The ``clarke`` experiment's methods: one population of initialisations per method, trained by the online loop.

:func:`start_method` builds a method's :class:`MethodRun` (the :class:`~bilevel.tuner.OnlineTuner` of
:func:`build_tuner`, its batch samplers and the recording subsets) for members ``first ...``;
:func:`method_results` turns a trained run into the results a method records. The authors' Baydin
baseline is the library's :class:`bilevel.strategies.AuthorsBaydin` (:func:`is_authors_baydin`). Nothing here
writes files (:mod:`~bilevel_studies.clarke.running` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bilevel import hparams as H
from bilevel import population as pop
from bilevel.callbacks import RandomLRMultiplier
from bilevel.schedules import Adaptive
from bilevel.strategies import AuthorsBaydin
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import SGD

from .config import METHODS, ClarkeConfig, Method, space_for
from .problem import Batches, Problem

#: the ``variant`` recorded in the results and checkpoints of method ``baydin`` (the authors' Baydin); files of
#: ``baydin`` without it come from the earlier ``baydin`` and are moved to ``baydin-ours`` (``running._migrate_baydin``)
AUTHORS_BAYDIN = "authors"


def is_authors_baydin(tuner: OnlineTuner) -> bool:
    """Whether ``tuner`` runs Clarke et al.'s Baydin baseline (:class:`bilevel.strategies.AuthorsBaydin`).

    From ``configs/Baydin.yaml`` and ``optimisers.BaydinHypergradientDescent`` of
    rmclarke/OptimisingWeightUpdateHyperparameters: after every weight step (``force_single_network_weight_step``)
    the raw hyperparameter ``log10 lr`` (only the learning rate is tuned; momentum and weight decay stay at their
    initial values) gets ``-(dL(w_t; B') . dL(w_{t-1}; B))``, applied by plain SGD 0.001 and clamped into
    ``[-10, 0]``; B' comes from a second sampler over the same (training + validation) data. The library's
    ``mode="baydin"`` (method ``baydin-ours``) differentiates the training loss through the whole step instead.

    Args:
        tuner: a method's tuner.

    Returns:
        ``True`` for method ``baydin``.
    """
    return isinstance(tuner.strategy, AuthorsBaydin)


def build_tuner(
    cfg: ClarkeConfig,
    problem: Problem,
    method: Method,
    *,
    first: int = 0,
    hparams: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
) -> OnlineTuner:
    """The population of initialisations ``first, ..., first + cfg.inits - 1`` of ``method``.

    Member j's weights and Table 5 hyperparameters come from seed ``derived_seed(cfg.seed, first + j)``
    (``cfg.seed * 1_000_003 + first + j``, :func:`bilevel.population.derived_seed`; see
    :func:`bilevel.population.init_population`), so a block of members equals the same members of
    one big population. ``hparams`` (natural values, one per member, per hyperparameter name of
    the space) replaces the sampled initial hyperparameters: used by ASHA/PBT and Bayesian
    optimisation, which propose them themselves.
    """
    space = space_for(method, cfg.lr_max)
    dtype = getattr(torch, cfg.dtype)
    params, raw = pop.init_population(
        problem.init, cfg.inits, pop.derived_seed(cfg.seed, first), lambda p, g: space.init(p, g, dtype=dtype)
    )
    if hparams is not None:
        raw = natural_population(space, params, hparams, dtype)
    params = {k: v.to(cfg.device) for k, v in params.items()}
    raw = {k: v.to(cfg.device) for k, v in raw.items()}
    train = pop.vmap_loss(problem.forward, problem.loss)
    scale = problem.test_scale
    test = lambda p, h, batch: train(p, h, batch) * scale  # noqa: E731
    tcfg = TunerConfig(
        tuned=method.tuned,
        interval=cfg.interval,
        lookback=cfg.lookback,
        mode="none" if not method.tuned else method.mode,
        hyper_lr=cfg.baydin_hyper_lr if method.authors_baydin else cfg.hyper_lr,
        hyper_optimizer=torch.optim.SGD if method.authors_baydin else torch.optim.Adam,
        record_every=_record_every(cfg),
        grad_clip=cfg.grad_clip if cfg.grad_clip is not None else (0.25 if problem.kind == "language-model" else None),
        on_divergence=cfg.on_divergence,  # type: ignore[arg-type]
    )
    callbacks = [RandomLRMultiplier(*method.lr_multiplier, seed=cfg.seed)] if method.lr_multiplier else []
    return OnlineTuner(
        params,
        raw,
        space,
        SGD(),
        train,
        train,
        update_form=space.names,
        config=tcfg,
        test_loss=test,
        callbacks=callbacks,
        strategy=AuthorsBaydin(raw_clip=(-10.0, 0.0)) if method.authors_baydin else None,
        schedule=Adaptive(cfg.interval, max_interval=cfg.max_interval)
        if cfg.max_interval is not None and tcfg.mode in ("ift", "unroll")
        else None,
    )


def natural_population(
    space: H.HyperParameterSpace,
    params: Mapping[str, torch.Tensor],
    values: Mapping[str, Sequence[float] | torch.Tensor],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Stacked raw hyperparameters of a population from one natural value per member and name."""
    P = pop.size(params)
    lists = {
        n: torch.as_tensor(values[n], dtype=torch.float64).reshape(-1) if n in values else None for n in space.names
    }
    bad = [n for n, v in lists.items() if v is None or v.numel() != P]
    if bad:
        raise ValueError(
            f"initial hyperparameters {bad} need one natural value per member ({P}); "
            f"got { ({n: None if v is None else v.numel() for n, v in lists.items()}) }"
        )
    return pop.stack(
        [
            space.from_natural(pop.member(params, i), {n: lists[n][i] for n in space.names}, dtype=dtype)
            for i in range(P)
        ]
    )


def _record_every(cfg: ClarkeConfig) -> int:
    return cfg.record_every or max(1, cfg.steps // 50)


@dataclass
class MethodRun:
    """One method's population in training: the tuner, its batch samplers and the recording subsets."""

    tuner: OnlineTuner
    train_batches: Any
    val_batches: Any
    record: tuple

    def advance(self, steps: int, progress: Callable[[int], None] | None = None) -> None:
        self.tuner.run(steps, self.train_batches, self.val_batches, record_batches=self.record, progress=progress)

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "tuner": self.tuner.state_dict(),
            "train_batches": self.train_batches.state_dict(),
            "val_batches": self.val_batches.state_dict(),
        }
        if is_authors_baydin(self.tuner):
            sd["variant"] = AUTHORS_BAYDIN  # tells it from a checkpoint of the earlier "baydin" (now baydin-ours)
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.tuner.load_state_dict(sd["tuner"])
        self.train_batches.load_state_dict(sd["train_batches"])
        self.val_batches.load_state_dict(sd["val_batches"])


def start_method(
    cfg: ClarkeConfig,
    problem: Problem,
    method: str | Method,
    *,
    first: int = 0,
    hparams: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
) -> MethodRun:
    """A fresh :class:`MethodRun` of members ``first ...`` (see :func:`build_tuner`)."""
    method = METHODS[method] if isinstance(method, str) else method
    tuner = build_tuner(cfg, problem, method, first=first, hparams=hparams)
    if method.merge_train_val and len(problem.val[0]):
        train_data = problem.merge(problem.train, problem.val)
    else:
        train_data = problem.train
    sampler = problem.batches or (lambda data, seed: Batches(data, cfg.batch_size, seed))
    record = tuple(problem.chunks(d, cfg.record_rows)[0] for d in (problem.train, problem.val, problem.test))
    # the authors' Baydin draws its second batch B' from a second sampler over its own (merged) training data
    run = MethodRun(
        tuner,
        sampler(train_data, pop.derived_seed(cfg.seed, 0)),
        sampler(train_data if method.authors_baydin else problem.val, pop.derived_seed(cfg.seed, 1)),
        record,
    )
    if is_authors_baydin(tuner):
        tuner.strategy.next_batches = run.val_batches  # type: ignore[attr-defined]  # checkpointed with the run's
    return run


def method_results(cfg: ClarkeConfig, problem: Problem, run: MethodRun) -> dict[str, Any]:
    """Final losses (whole validation/test sets), curves and hyperparameter trajectories of a run."""
    tuner, record = run.tuner, run.record
    h = tuner.history
    if not h.step or h.step[-1] != tuner.t:
        tuner.record(*record)
    # validation and test losses over the whole sets; the training loss on the recorded subset
    finals = {
        name: member_losses(tuner, problem, data, cfg.record_rows) * (problem.test_scale if name != "train" else 1.0)
        for name, data in (
            ("train", record[0]),
            ("val", _head(problem, problem.val, cfg.eval_rows)),
            ("test", _head(problem, problem.test, cfg.eval_rows)),
        )
    }
    cap = cfg.outlier_threshold if cfg.outlier_threshold is not None else math.inf
    ok = [bool(a) and math.isfinite(t) and t <= cap for a, t in zip(tuner.alive.tolist(), finals["test"].tolist())]

    def final(values: torch.Tensor) -> list[float | None]:
        return [float(v) if good else None for v, good in zip(values.tolist(), ok)]

    variant = {"variant": AUTHORS_BAYDIN} if is_authors_baydin(tuner) else {}
    return {
        **variant,
        "final_test_loss": final(finals["test"]),
        "final_val_loss": final(finals["val"]) if len(problem.val[0]) else [None] * tuner.P,
        "final_train_loss": final(finals["train"]),
        "seconds": [h.seconds / tuner.P] * tuner.P,
        "wall_seconds": h.seconds,
        "diverged_at": h.diverged_at,
        **({"rollbacks": _rollbacks(h.events, tuner.P)} if cfg.on_divergence == "rollback" else {}),
        "curves": {"step": h.step, "test_loss": h.test_loss, "val_loss": h.val_loss, "train_loss": h.train_loss},
        "hparams": {"step": h.step, **h.hparams},
    }


def _rollbacks(events: list[dict[str, Any]], members: int) -> list[int]:
    """How many times each member was rolled back (``on_divergence="rollback"``)."""
    counts = [0] * members
    for e in events:
        if e["action"] == "rollback":
            counts[e["member"]] += 1
    return counts


def _head(problem: Problem, data: tuple[torch.Tensor, torch.Tensor], rows: int | None):
    return data if rows is None else problem.chunks(data, rows)[0]


def member_losses(
    tuner: OnlineTuner, problem: Problem, data: tuple[torch.Tensor, torch.Tensor], rows: int
) -> torch.Tensor:
    """Per-member mean loss over all of ``data`` (in chunks of ``rows`` examples), shape (P,)."""
    if len(data[0]) == 0:
        return torch.full((tuner.P,), math.nan)
    total, count = torch.zeros(tuner.P, dtype=torch.float64), 0
    with torch.no_grad():
        for x, y in problem.chunks(data, rows):
            n = y.numel()
            total += tuner.train_loss(tuner.params, None, (x, y)).double().cpu() * n
            count += n
    return total / count


def three_batched(random: dict[str, Any]) -> dict[str, Any]:
    """Random (3-batched): of every three consecutive random runs keep the one with the best validation loss.

    ``n // 3`` groups; a remainder of one or two runs forms no group. ``seconds`` of a group is the
    three runs' sum (the compute the paper charges it).
    """
    out: dict[str, list[Any]] = {"final_test_loss": [], "final_val_loss": [], "seconds": []}
    n = len(random["final_test_loss"])
    for i in range(0, n - n % 3, 3):
        group = [
            j
            for j in range(i, i + 3)
            if random["final_val_loss"][j] is not None and random["final_test_loss"][j] is not None
        ]
        best = min(group, key=lambda j: random["final_val_loss"][j]) if group else None
        out["final_test_loss"].append(None if best is None else random["final_test_loss"][best])
        out["final_val_loss"].append(None if best is None else random["final_val_loss"][best])
        out["seconds"].append(sum(random["seconds"][i : i + 3]))
    return out
