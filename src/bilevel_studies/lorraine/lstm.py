"""Lorraine et al. (2020) sec. 5.5, Table 4 and Fig. 8: AWD-LSTM regularisers tuned by hypergradients on PTB.

Settings (``--settings``):

* ``none``: the 7 AWD-LSTM hyperparameters fixed at their initial values (all rates 0.5,
  as the paper's initialisation; AR alpha = 2, TAR beta = 1);
* ``scalar``: the same 7 hyperparameters tuned ("Ours");
* ``many``: one rate per word / unit / hidden-to-hidden weight ("Ours, Many");
* ``overfit``: Fig. 8, 10 training and 10 validation sequences, one weight decay per
  weight tuned by :class:`bilevel.tuner.OnlineTuner` to drive the validation loss down
  (:func:`run_overfit`; a smaller LSTM, ``--overfit-size``, and Adam on the weights;
  ``--overfit-style authors`` for the authors' parametrisation).

The tuned settings record, per hyperparameter tensor, the signal-to-noise ratio of its hypergradients over
the hyper steps and how far it moved (``hypergradient_stats``, :func:`hypergradient_stats`).

The first three run Algorithm 1 (:class:`bilevel.tuner.OnlineTuner` on one model): ``--interval``
SGD steps (learning rate ``--lr``, gradient norm clipped to ``--clip``, AWD-LSTM's 30 and 0.25),
then one Adam step on the raw (logit / log10) hyperparameters along the IFT hypergradient with
``--terms`` K Neumann steps (K + 1 terms of the series) on the update map. Dropout is concrete dropout
(:mod:`bilevel.dropout`) with one uniform-noise draw per training step, reused by the
hypergradient of that step, so the training loss is a deterministic function of (w, lambda).
The validation loss (for the hypergradient and the reported perplexities) uses no dropout.

The paper's model is 2 x 650 units (``--hidden 650 --embed 650``); the default is a
CPU-sized 2 x 128 network trained for ``--steps`` mini-batches (see docs/augment_lstm.md).
Every window of ``--bptt`` tokens starts from a zero state (:mod:`bilevel.nets.lstm`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bilevel import loop
from bilevel import population as pop
from bilevel.errors import NonFiniteError
from bilevel.rundir import atomic_savefig, atomic_write_json
from bilevel.solvers import Neumann
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import SGD

from .. import _common as C
from .._parts import cached_part, say_resumed, settings_key

NAME = "lstm"
HELP = "Lorraine et al. Table 4 / Fig. 8: tune AWD-LSTM dropout/DropConnect/AR/TAR (scalar or per unit/weight) on PTB"
SETTINGS = ("none", "scalar", "many", "overfit")


def _windows(source: torch.Tensor, bptt: int):
    from bilevel.data.ptb import get_batch

    return [get_batch(source, i, bptt) for i in range(0, len(source) - 1, bptt)]


@torch.no_grad()
def perplexity(params, windows, max_windows: int | None = None) -> float:
    """exp(mean token cross-entropy) without dropout over the windows (each from a zero state)."""
    from bilevel.nets.awd_lstm import awd_lstm_loss

    total = n = 0.0
    for x, y in windows[:max_windows]:
        total += float(awd_lstm_loss(params, x, y)) * y.numel()
        n += y.numel()
    return math.exp(total / n)


def hypergradient_stats(stats: dict, raw0: dict, raw1: dict) -> dict:
    """Per raw hyperparameter tensor: how consistent its hypergradients were over the hyper steps and how far
    it moved. ``snr`` of an element is ``|mean| / sd`` of its hypergradients over the hyper steps (large: a
    consistent direction that Adam follows at ~lr per step; small: noise, a random walk of ~lr * sqrt(steps));
    ``sign_agreement`` is ``|mean of signs|`` (1: always the same sign). Medians over the elements."""
    out = {}
    for k, (s1, s2, n, signs) in stats.items():
        if n < 2:
            continue
        mean = s1 / n
        sd = (s2 / n - mean**2).clamp(min=0).sqrt() * math.sqrt(n / (n - 1))
        snr = (mean.abs() / sd.clamp(min=1e-300)).reshape(-1)
        moved = (raw1[k].detach().double() - raw0[k].double()).abs().reshape(-1)
        out[k] = {
            "elements": snr.numel(),
            "hyper_steps": n,
            "snr_median": float(snr.median()),
            "snr_mean": float(snr.mean()),
            "sign_agreement_median": float((signs / n).abs().reshape(-1).median()),
            "raw_change_median": float(moved.median()),
            "raw_change_max": float(moved.max()),
        }
    return out


def run_setting(a, setting: str, corpus, progress=None) -> dict:
    from bilevel.data.ptb import batchify
    from bilevel.nets.awd_lstm import awd_lstm_loss, awd_noise, awd_sites, awd_space
    from bilevel.nets.lstm import lstm_lm_init

    dtype, device = getattr(torch, a.dtype), torch.device(a.device)
    g = torch.Generator().manual_seed(a.seed)
    params = {k: v.to(device) for k, v in lstm_lm_init(corpus.ntokens, a.embed, a.hidden, a.layers, g, dtype).items()}
    space, raw = awd_space(params, "element" if setting == "many" else "scalar", rate=a.init_rate)
    raw = {k: v.to(device) for k, v in raw.items()}
    train = _windows(batchify(corpus.train, a.batch_size, device), a.bptt)
    val = _windows(batchify(corpus.valid, a.eval_batch_size, device), a.bptt)
    test = _windows(batchify(corpus.test, a.eval_batch_size, device), a.bptt)

    def loss(p, nat, ctx):
        x, y, noise = ctx
        return awd_lstm_loss(p, x, y, nat, noise, a.temperature) if noise is not None else awd_lstm_loss(p, x, y)

    cfg = TunerConfig(
        tuned=space.names,
        mode="none" if setting == "none" else "ift",
        lookback=a.lookback,
        solver=Neumann(a.lookback, alpha=1.0, divergence="ignore"),  # i Neumann steps at alpha 1, as recorded
        hyper_lr=a.hyper_lr,
        grad_clip=a.clip,
        interval=a.interval,
        on_divergence="raise",
    )
    curve: list[dict] = []
    hg_stats: dict[str, list] = {}  # raw key -> [sum, sum of squares, count, sum of signs] of the hypergradients

    def train_batch():  # window t (cycling) and one concrete-dropout noise draw, reused by the hypergradient
        x, y = train[alg.t % len(train)]
        return x, y, awd_noise(alg.params, x.shape[1], g)

    def val_batch():  # a random validation window, no dropout
        xv, yv = val[int(torch.randint(0, len(val), (), generator=g))]
        return xv, yv, None

    class Watch:
        """The hypergradient statistics and the training curve."""

        def on_interval(self, tuner):
            if not tuner.tunes:  # "none" takes no hyperparameter step but draws (and drops) its validation
                val_batch()  # window, so that every setting draws the same dropout noise

        def on_hyper_step(self, tuner):
            for k, v in tuner.last_hypergradient.items():
                zero = torch.zeros_like(v, dtype=torch.float64)
                st = hg_stats.setdefault(k, [zero, zero.clone(), 0, zero.clone()])
                st[0] += v.double()
                st[1] += v.double() ** 2
                st[2] += 1
                st[3] += v.double().sign()

        def on_record(self, tuner):  # after the step's hyperparameter step
            curve.append({"step": tuner.t, "train_loss": float(tuner.last_losses), **space.describe(tuner.raw)})

    alg = OnlineTuner(params, raw, space, SGD(lr=a.lr), loss, loss, config=cfg, stacked=False, callbacks=[Watch()])
    start, diverged = time.perf_counter(), None
    try:
        loop.run(
            alg,
            a.steps,
            train_batch,
            val_batch,
            schedule=loop.Every(a.interval),
            record_batches=(None, None, None),  # records of no losses: the curve, by Watch.on_record
            record_every=a.record_every,
            progress=progress,
        )
    except NonFiniteError as e:
        diverged = e.step - 1  # the 0-based weight step that failed (or that a failing hyperparameter step followed)
    seconds = time.perf_counter() - start
    n_h = sum(v.numel() for v in raw.values())
    res = {
        "setting": setting,
        "seconds": seconds,
        "diverged_at": diverged,
        "n_hyperparameters": n_h,
        "n_weights": sum(v.numel() for v in params.values()),
        "curve": curve,
        "final_hparams": space.describe(alg.raw),
        "sites": {k: list(v.shape) for k, v in awd_sites(params).items()},
        "hypergradient_stats": hypergradient_stats(hg_stats, raw, alg.raw),
    }
    if diverged is None:
        res["val_ppl"] = perplexity(alg.params, val, a.eval_windows)
        res["test_ppl"] = perplexity(alg.params, test, a.eval_windows)
    return res


def run_overfit(a, corpus, progress=None) -> dict:
    """Fig. 8: ``--overfit-sequences`` training and validation sequences, one weight decay per weight.

    Weights: Adam (``--overfit-lr``) on the cross-entropy plus ``1/2 sum lambda_i w_i^2``
    (coupled L2, as ``torch.optim.Adam``'s weight decay), full batch. Decays: log10 space,
    initial ``--overfit-wd``, clipped to ``[1e-12, --overfit-max-decay]`` (``--overfit-signed``: natural
    space, either sign, clipped to ``[-max, max]``), an Adam step
    (``--overfit-hyper-lr``) along the IFT hypergradient (``--overfit-terms`` K Neumann steps, K + 1
    terms, on the Adam update map; 0 = identity) every ``--overfit-interval`` weight steps, by
    :class:`bilevel.tuner.OnlineTuner`. The same training without hyperparameter steps is the
    baseline (``"none"``), so the drop of the validation loss is attributable to the decays.

    ``--overfit-style authors`` is the authors' set-up (``rnn/train2.py``, ``model_basic.py``): decoder tied
    to the embedding, ``sum_i exp(l_i) w_i^2`` added to the training loss (loss-form; ``l`` the natural log of
    the coefficient, initial ``--overfit-wd``, unclipped) and the IFT on ``dL_T/dw = 0`` (identity: their
    ``-v^T d^2 L_T / dw dl``). Also recorded: :func:`unigram_floor` of the validation targets and, per weight
    tensor, how the decays moved (``decays_by_tensor``).
    """
    from bilevel.data.ptb import batchify
    from bilevel.hparams import Granularity, HyperParameter, HyperParameterSpace, weight_decay
    from bilevel.nets.lstm import lstm_lm_forward, lstm_lm_init
    from bilevel.solvers import Identity, Neumann
    from bilevel.updates import Adam

    dtype, device = getattr(torch, a.dtype), torch.device(a.device)
    n, size = a.overfit_sequences, a.overfit_size
    authors = getattr(a, "overfit_style", "ours") == "authors"
    tr = batchify(corpus.train[: n * (a.bptt + 1)], n, device)  # n contiguous sequences of bptt + 1 tokens
    va = batchify(corpus.valid[: n * (a.bptt + 1)], n, device)
    train_b, val_b = (tr[:-1], tr[1:].reshape(-1)), (va[:-1], va[1:].reshape(-1))
    p = {
        k: v.to(device)
        for k, v in lstm_lm_init(
            corpus.ntokens, size, size, a.layers, torch.Generator().manual_seed(a.seed), dtype
        ).items()
    }
    penalty, update_form, implicit = None, ("weight_decay",), "update"
    if authors:
        # the authors' rnn/train2.py + model_basic.py: tied embedding/decoder, penalty sum_i exp(l_i) w_i^2 added
        # to the training loss (loss-form), l_i = ln of the coefficient, no clipping; IFT on dL_T/dw = 0
        del p["dec_W"]
        spec = HyperParameter(
            "weight_decay", "log", a.overfit_wd, a.overfit_wd, "natural", Granularity("element"), None, None
        )

        def penalty(w, nat):
            c = nat["weight_decay"]
            return sum((c[k] * v.pow(2)).reshape(v.shape[0], -1).sum(1) for k, v in w.items())

        update_form, implicit = (), "loss"
        forward = tied_lstm_lm_forward
    elif a.overfit_signed:  # natural (linear) space, either sign: a negative decay pushes its weight outwards
        spec = HyperParameter(
            "weight_decay",
            "identity",
            a.overfit_wd,
            a.overfit_wd,
            "natural",
            Granularity("element"),
            (-a.overfit_max_decay, a.overfit_max_decay),
            None,
        )
        forward = lstm_lm_forward
    else:
        spec = weight_decay("element", clip=(1e-12, a.overfit_max_decay))
        forward = lstm_lm_forward
    space = HyperParameterSpace([spec])
    raw = space.from_natural(p, {"weight_decay": a.overfit_wd})
    loss = pop.vmap_loss(forward, F.cross_entropy)
    solver = Identity() if a.overfit_lookback == 0 else Neumann(a.overfit_lookback, alpha=1.0, divergence="ignore")
    out: dict = {
        "setting": "overfit",
        "style": "authors" if authors else ("signed" if a.overfit_signed else "ours"),
        "n_hyperparameters": sum(v.numel() for v in raw.values()),
        "n_weights": sum(v.numel() for v in p.values()),
        "initial_val_loss": float(loss(pop.stack([p]), None, val_b)[0]),
        **unigram_floor(val_b[1], train_b[1]),
    }
    for mode in ("ift", "none"):
        cfg = TunerConfig(
            tuned=("weight_decay",),
            interval=a.overfit_interval,
            mode=mode,
            solver=solver,
            hyper_lr=a.overfit_hyper_lr,
            record_every=a.overfit_record_every,
            implicit=implicit,
        )
        tuner = OnlineTuner(
            pop.stack([p]),
            pop.stack([raw]),
            space,
            Adam(lr=a.overfit_lr),
            loss,
            loss,
            update_form=update_form,
            penalty=penalty,
            config=cfg,
        )
        hist = tuner.run(
            a.overfit_steps, lambda: train_b, lambda: val_b, record_batches=(train_b, val_b, None), progress=progress
        )
        key = "" if mode == "ift" else "none_"
        out.update(
            {
                f"{key}seconds": hist.seconds,
                f"{key}diverged_at": hist.diverged_at[0],
                f"{key}train_loss": hist.train_loss[0],
                f"{key}val_loss": hist.val_loss[0],
                f"{key}final_val_loss": hist.val_loss[0][-1] if hist.val_loss else None,
                f"{key}final_train_loss": hist.train_loss[0][-1] if hist.train_loss else None,
            }
        )
        if mode == "ift":
            nat = space.natural({k: v.detach() for k, v in tuner.raw.items()})["weight_decay"]
            flat = torch.cat([v[0].reshape(-1).to(torch.float64) for v in nat.values()])
            out.update(
                {
                    "step": hist.step,
                    "weight_decay_mean": hist.hparams["weight_decay"][0],
                    "weight_decay": {
                        "median": float(flat.median()),
                        "min": float(flat.min()),
                        "max": float(flat.max()),
                        "count": flat.numel(),
                    },
                    "min_val_loss": min((v for v in hist.val_loss[0] if v is not None), default=None),
                    "decays_by_tensor": {
                        k: {
                            "median": float(v[0].double().median()),
                            "max": float(v[0].double().max()),
                            "frac_up_10x": float((v[0] > 10 * a.overfit_wd).double().mean()),
                            "frac_down_10x": float((v[0] < a.overfit_wd / 10).double().mean()),
                            "frac_negative": float((v[0] < 0).double().mean()),
                        }
                        for k, v in nat.items()
                    },
                }
            )
    return out


def tied_lstm_lm_forward(params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`bilevel.nets.lstm.lstm_lm_forward` with the decoder tied to the embedding (``dec_W = emb``, as the
    authors' and AWD-LSTM's models; needs embedding size = hidden size of the last layer)."""
    from bilevel.nets.lstm import lstm_lm_forward

    return lstm_lm_forward({**params, "dec_W": params["emb"]}, tokens)


def unigram_floor(val_targets: torch.Tensor, train_targets: torch.Tensor) -> dict:
    """What a context-free predictor can reach on the validation targets: the entropy (nats) of their own
    empirical unigram distribution (the best constant prediction, fitted *to the validation set*), the log of
    their number of distinct tokens, and how many of those never occur among the training targets."""
    counts = torch.bincount(val_targets.reshape(-1)).double()
    q = counts[counts > 0] / counts.sum()
    distinct = val_targets.unique()
    unseen = (~torch.isin(distinct, train_targets.reshape(-1).unique())).sum()
    return {
        "val_unigram_entropy": float(-(q * q.log()).sum()),
        "val_distinct_targets": int(distinct.numel()),
        "val_log_distinct": math.log(distinct.numel()),
        "val_targets_unseen_in_train": int(unseen),
        "val_targets": int(val_targets.numel()),
    }


def _plot(doc: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    rows = [r for r in doc["results"].values() if r.get("curve")]
    ov = doc["results"].get("overfit")
    fig = Figure(figsize=(10, 3.6))
    ax = fig.add_subplot(1, 3, 1)
    for r in rows:
        ax.plot([c["step"] for c in r["curve"]], [c["train_loss"] for c in r["curve"]], label=r["setting"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (with dropout)")
    if rows:
        ax.legend()
    ax = fig.add_subplot(1, 3, 2)
    for r in rows:
        for name in ("dropoute", "dropouti", "dropouth", "dropouto", "wdrop"):
            ax.plot(
                [c["step"] for c in r["curve"]],
                [c[name] for c in r["curve"]],
                label=f"{r['setting']}:{name}",
                ls="-" if r["setting"] == "scalar" else "--",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("mean dropout rate")
    if rows:
        ax.legend(fontsize=6)
    if ov is not None:
        ax = fig.add_subplot(1, 3, 3)
        ax.plot(ov["step"], ov["train_loss"], label="train")
        ax.plot(ov["step"], ov["val_loss"], label="validation")
        ax.plot(ov["step"], ov["none_train_loss"], ls="--", label="train (no HO)")
        ax.plot(ov["step"], ov["none_val_loss"], ls="--", label="validation (no HO)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Fig. 8: 10 train / 10 val sequences")
        ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, out / "lstm.png", dpi=110)


def _print(doc: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(
        title=f"AWD-LSTM regularisers on PTB ({doc['config']['layers']}x{doc['config']['hidden']}, "
        f"{doc['config']['steps']} steps)"
    )
    for c in ("setting", "hyperparameters", "val ppl", "test ppl", "time (s)", "note"):
        t.add_column(c, justify="left" if c in ("setting", "note") else "right")
    for name, r in doc["results"].items():
        if name == "overfit":
            fin = lambda k, r=r: "diverged" if r[k] is None else f"{r[k]:.3f}"  # noqa: E731
            note = (
                f"val loss {r['initial_val_loss']:.3f} -> {fin('final_val_loss')} (no HO: "
                f"{fin('none_final_val_loss')}); train loss {fin('final_train_loss')} "
                f"(no HO: {fin('none_final_train_loss')})"
            )
            t.add_row(name, str(r["n_hyperparameters"]), "-", "-", f"{r['seconds']:.0f}", note)
        else:
            ppl = lambda k, r=r: "diverged" if r.get(k) is None else f"{r[k]:.1f}"  # noqa: E731
            t.add_row(name, str(r["n_hyperparameters"]), ppl("val_ppl"), ppl("test_ppl"), f"{r['seconds']:.0f}", "")
    console.print(t)


def add_arguments(p) -> None:
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--embed", type=C.positive_int, default=128, help="embedding size (paper: 650)")
    p.add_argument("--hidden", type=C.positive_int, default=128, help="LSTM units per layer (paper: 650)")
    p.add_argument("--layers", type=C.positive_int, default=2, help="LSTM layers (paper: 2)")
    p.add_argument("--steps", type=C.positive_int, default=600, help="training mini-batches per setting")
    p.add_argument("--batch-size", type=C.positive_int, default=20, help="paper: 40")
    p.add_argument(
        "--eval-batch-size", type=C.positive_int, default=10, help="streams of the validation/test evaluation"
    )
    p.add_argument("--bptt", type=C.positive_int, default=35, help="window length (paper: 70)")
    p.add_argument("--lr", type=C.positive_float, default=30.0, help="SGD learning rate (AWD-LSTM)")
    p.add_argument("--clip", type=C.positive_float, default=0.25, help="gradient-norm clipping (AWD-LSTM)")
    p.add_argument("--interval", type=C.positive_int, default=10, help="weight steps between hyperparameter steps")
    p.add_argument(
        "--lookback",
        type=C.nonnegative_int,
        default=3,
        help="K: Neumann steps of the IFT hypergradient (Neumann(steps=K) sums K + 1 terms)",
    )
    C.add_deprecated_alias(p, "--terms", "--lookback", type=C.nonnegative_int)
    p.add_argument(
        "--hyper-lr",
        type=C.positive_float,
        default=0.01,
        help="Adam learning rate of the raw hyperparameters (paper: 0.001 over a much longer run)",
    )
    p.add_argument("--init-rate", type=C.fraction, default=0.5, help="initial dropout/DropConnect rates (paper: 0.5)")
    p.add_argument("--temperature", type=C.positive_float, default=0.1, help="concrete-dropout temperature")
    p.add_argument("--eval-windows", type=C.positive_int, default=None, help="evaluate on the first N windows only")
    p.add_argument("--record-every", type=C.positive_int, default=20, help="record the training curve every N steps")
    p.add_argument(
        "--overfit-sequences",
        type=C.positive_int,
        default=10,
        help="training and validation sequences of the Fig. 8 check (paper: 10)",
    )
    p.add_argument(
        "--overfit-size",
        type=C.positive_int,
        default=32,
        help="embedding and hidden size of the Fig. 8 LSTM (paper: 650)",
    )
    p.add_argument(
        "--overfit-steps",
        type=C.positive_int,
        default=200,
        help="weight steps of the Fig. 8 check (run twice: tuned and fixed decays)",
    )
    p.add_argument("--overfit-lr", type=C.positive_float, default=0.01, help="Adam learning rate of the weights")
    p.add_argument(
        "--overfit-wd",
        type=C.finite_float,
        default=1e-4,
        help="initial weight decay (every weight; > 0, any sign with --overfit-signed)",
    )
    p.add_argument(
        "--overfit-max-decay", type=C.positive_float, default=10.0, help="decays are clipped to [1e-12, this]"
    )
    p.add_argument("--overfit-hyper-lr", type=C.positive_float, default=0.1, help="Adam learning rate of log10 decays")
    p.add_argument(
        "--overfit-interval", type=C.positive_int, default=1, help="weight steps between hyperparameter steps"
    )
    p.add_argument(
        "--overfit-lookback",
        type=C.nonnegative_int,
        default=0,
        help="K: Neumann steps (K + 1 terms of the series) of the Fig. 8 hypergradient; 0 = the identity "
        "approximation J^-1 ~ I",
    )
    C.add_deprecated_alias(p, "--overfit-terms", "--overfit-lookback", type=C.nonnegative_int)
    p.add_argument(
        "--overfit-signed",
        action="store_true",
        help="Fig. 8 decays in natural space with either sign, clipped to [-max, max] (default: log10 "
        "space, non-negative); see docs/augment_lstm.md",
    )
    p.add_argument("--overfit-record-every", type=C.positive_int, default=20, help="record Fig. 8 losses every N steps")
    p.add_argument(
        "--overfit-style",
        choices=["ours", "authors"],
        default="ours",
        help="Fig. 8 parametrisation. ours: log10 decays xi, coupled into Adam (grad + xi w, i.e. 1/2 xi w^2), "
        "IFT on Adam's update map. authors (rnn/train2.py): tied embedding/decoder, penalty sum exp(l) w^2 in the "
        "training loss with l = ln of the coefficient (initial --overfit-wd, unclipped), IFT on dL_T/dw = 0",
    )


def check_arguments(a) -> None:
    C.check_names("--settings", C.names(a.settings), SETTINGS)
    if getattr(a, "overfit_style", "ours") == "authors" and a.overfit_signed:
        raise ValueError("--overfit-style authors has exp(l) coefficients (positive): drop --overfit-signed")
    if not a.overfit_signed and not a.overfit_wd > 0:
        raise ValueError(
            f"--overfit-wd must be > 0 (log10 decays; use --overfit-signed for any sign), got {a.overfit_wd}"
        )


#: the options the Fig. 8 check depends on (besides the ``--overfit-*`` ones)
OVERFIT_SHARED = ("bptt", "layers", "seed", "dtype", "device")


def part_key(a, setting: str) -> dict:
    """The options that produced one setting's result: the ``--overfit-*`` options (and :data:`OVERFIT_SHARED`)
    for ``overfit``, all the others for ``none`` / ``scalar`` / ``many``."""
    names = [k for k in vars(a) if k.startswith("overfit_")]
    if setting == "overfit":
        return settings_key(a, keep=(*names, *OVERFIT_SHARED), setting=setting)
    return settings_key(a, drop=("settings", *names), setting=setting)


def metrics_of(results: dict) -> dict:
    """``metrics.<setting>``: perplexities (``none`` / ``scalar`` / ``many``) or the Fig. 8 validation losses
    (``overfit``), seconds and the number of hyperparameters."""
    out = {}
    for name, r in results.items():
        row = {
            "seconds": r.get("seconds"),
            "num_hyperparameters": r.get("n_hyperparameters"),
            "diverged_at": r.get("diverged_at"),
        }
        if name == "overfit":
            row.update(
                {
                    k: r.get(k)
                    for k in (
                        "initial_val_loss",
                        "final_val_loss",
                        "min_val_loss",
                        "final_train_loss",
                        "none_final_val_loss",
                        "none_final_train_loss",
                    )
                }
            )
        else:
            row.update({"val_ppl": r.get("val_ppl"), "test_ppl": r.get("test_ppl")})
        out[name] = row
    return out


def main(a, progress_factory=None, console=None) -> dict:
    """Every setting is one part (``out/parts/<setting>.json``, keyed by :func:`part_key`): re-running the same
    command skips the settings already finished; changing an option they depend on recomputes them."""
    from bilevel.data.ptb import load_ptb

    check_arguments(a)
    settings = C.names(a.settings)
    out = Path(a.out)
    corpus = load_ptb(a.data_dir)
    results, resumed = {}, []
    start = time.perf_counter()
    for s in settings:

        def compute(s=s):
            total = 2 * a.overfit_steps if s == "overfit" else a.steps
            advance = progress_factory(f"lstm {s}", total) if progress_factory else None
            return run_overfit(a, corpus, advance) if s == "overfit" else run_setting(a, s, corpus, advance)

        results[s], again = cached_part(out / "parts" / f"{s}.json", part_key(a, s), compute)
        if again:
            resumed.append(s)
    doc = {
        "experiment": NAME,
        "config": {k: v for k, v in vars(a).items() if isinstance(v, (int, float, str, bool))},
        "metrics": metrics_of(results),
        "results": results,
        "resumed": resumed,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(out / "results.json", doc, indent=1)
    _plot(doc, out)
    say_resumed(NAME, "setting(s)", resumed, out / "parts", console)
    _print(doc, console)
    return doc
