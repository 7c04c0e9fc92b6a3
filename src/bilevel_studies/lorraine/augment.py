"""Lorraine et al. (2020) sec. 5.4, Table 3 and Fig. 7: a learned data-augmentation network.

A classifier trains on augmented examples ``x~ = f_lambda(x, eps)`` (a residual U-Net
fed the image and a noise channel, :mod:`bilevel.nets.unet`, the identity at
initialisation) while every U-Net weight ``lambda`` is tuned on the validation loss
of the classifier on *un-augmented* validation images, by Algorithm 1
(:class:`bilevel.tuner.OnlineTuner`): ``--interval``
SGD steps on the weights, then one Adam step on ``lambda`` along the hypergradient

* ``none``: no hyperparameter optimisation (the augmenter stays the identity),
* ``neumann``: IFT with ``--terms`` K Neumann steps (``Neumann(steps=K)``: K + 1 terms of the series) on the
  update map ``u = lr * dL_T/dw``, Clarke et al. eq. 4-7, i.e. Lorraine's Alg. 3 with alpha = lr),
* ``unroll``: differentiation through the last ``--terms`` SGD steps,
* ``identity``: the IFT with ``J^{-1} ~ I`` (Luketina et al. 2016).

The noise ``eps`` of a training step is drawn once and reused by the hypergradient, so
the training loss is a deterministic function of (w, lambda).

``--aug-reg W`` adds the authors' regulariser of the augmenter to the validation loss (their
``train_augment_net2.py``, ``reg_weight``): ``W * (mean |E_eps[x~] - x| - mean std_eps(x~))`` over
``--aug-reg-samples`` noise draws of the validation images, a direct term of the hypergradient that
rewards stochastic (high-entropy) augmentations which stay centred on the image.
``--unet-init-scale s`` starts the U-Net's output convolution at ``s`` times torch's default
initialisation (the authors' U-Net is not zero-initialised, so it augments from the first step)
instead of zero (the identity); ``none`` always keeps the identity. Accuracies are
averaged over ``--aug-samples`` (10, appendix E.3) augmented copies of each image
(mean of the softmax), and also reported on the plain images.

Default: LeNet on a Fashion-MNIST subset (CPU-sized). ``--dataset cifar10`` runs the
paper's ResNet-18 on CIFAR-10 (needs the data and, realistically, a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel import loop
from bilevel import tree as T
from bilevel.errors import NonFiniteError
from bilevel.population import derived_seed
from bilevel.rundir import atomic_save, atomic_savefig, atomic_write_json, load_torch_state
from bilevel.solvers import Identity, Neumann
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import SGD

from .. import _common as C
from .._parts import load_part, save_part, say_resumed, settings_key

NAME = "augment"
HELP = "Lorraine et al. Table 3 / Fig. 7: learn a U-Net data-augmentation network by hypergradients"
METHODS = ("none", "neumann", "unroll", "identity")

Tree = T.Tree


def algorithm1(
    params, raw, space, rule, loss, method: str, terms: int, hyper_lr: float, interval: int, callbacks=()
) -> OnlineTuner:
    """Algorithm 1 (:class:`bilevel.tuner.OnlineTuner` on one model) for a method of Table 3
    (``none``, ``neumann``, ``unroll``, ``identity``), with ``callbacks`` (:mod:`bilevel.callbacks`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    mode = {"none": "none", "unroll": "unroll"}.get(method, "ift")
    solver = (
        Identity()
        if method == "identity"
        else (Neumann(terms, alpha=1.0, divergence="ignore") if method == "neumann" else None)
    )
    cfg = TunerConfig(
        tuned=space.names,
        mode=mode,
        solver=solver,
        lookback=terms,
        hyper_lr=hyper_lr,  # type: ignore[arg-type]
        interval=interval,
        on_divergence="raise",
    )
    return OnlineTuner(params, raw, space, rule, loss, loss, config=cfg, stacked=False, callbacks=callbacks)


# --------------------------------------------------------------------------- the experiment


def _load(dataset: str, data_dir, seed: int, train_size: int, val_size: int, dtype: torch.dtype, device):
    from bilevel.data.cifar import load_cifar10_splits
    from bilevel.data.mnist import load_mnist_splits

    if dataset in ("fashion-mnist", "mnist"):
        data = load_mnist_splits(data_dir, fashion=dataset == "fashion-mnist", flatten=False, seed=0, dtype=dtype)
    elif dataset == "cifar10":
        try:
            data = load_cifar10_splits(data_dir, flatten=False, seed=0, dtype=dtype)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"--dataset cifar10 needs the CIFAR-10 python batches: {exc}") from None
    else:
        raise ValueError(f"unknown dataset {dataset!r}: use fashion-mnist, mnist or cifar10")
    g = torch.Generator().manual_seed(1000 + seed)
    tr = torch.randperm(len(data.X_train), generator=g)[:train_size]
    va = torch.randperm(len(data.X_val), generator=g)[:val_size]
    return (
        (data.X_train[tr].to(device), data.y_train[tr].to(device)),
        (data.X_val[va].to(device), data.y_val[va].to(device)),
        (data.X_test.to(device), data.y_test.to(device)),
    )


def _classifier(dataset: str, shape, generator):
    from bilevel.nets.convnets import LeNet, module_init
    from bilevel.population import module_forward

    if dataset == "cifar10":
        from bilevel.nets.resnet import resnet18_forward, resnet18_init

        return resnet18_init(10, generator), resnet18_forward
    net = LeNet(shape[0], 10, shape[1])
    return module_init(net, generator), module_forward(net)


@torch.no_grad()
def evaluate(
    forward, params, unet, aug_params, X: Tensor, Y: Tensor, samples: int, generator, batch: int = 1000
) -> dict[str, float]:
    """Accuracy of the mean softmax over ``samples`` augmented copies, plain accuracy and plain loss."""
    from bilevel.nets.unet import augment

    correct_aug = correct = 0
    loss = 0.0
    for i in range(0, len(X), batch):
        x, y = X[i : i + batch], Y[i : i + batch]
        logits = forward(params, x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        probs = torch.zeros_like(logits)
        for _ in range(samples):
            eps = torch.randn((len(x), 1, *x.shape[2:]), generator=generator, dtype=torch.float64).to(x)
            probs += F.softmax(forward(params, augment(unet, aug_params, x, eps)), dim=1)
        correct_aug += int((probs.argmax(1) == y).sum())
    n = len(X)
    return {"acc_aug": correct_aug / n, "acc": correct / n, "loss": loss / n}


def augment_regulariser(unet, aug_params, x: Tensor, eps: Tensor) -> Tensor:
    """The authors' augmenter regulariser ``mean |mean_s x~_s - x| - mean std_s(x~_s)`` over the noise draws
    ``eps`` (shape (S, N, 1, H, W)): small when the augmentations are centred on the image and spread out.
    The standard deviation is ``sqrt(var + 1e-12)`` so that its gradient stays finite at the identity."""
    from bilevel.nets.unet import augment

    xs = torch.stack([augment(unet, aug_params, x, e) for e in eps])
    return (xs.mean(0) - x).abs().mean() - (xs.var(0) + 1e-12).sqrt().mean()


@torch.no_grad()
def augmentation_std(unet, aug_params, X: Tensor, samples: int, generator) -> float:
    """Mean over images and pixels of the standard deviation of ``samples`` augmentations (0: deterministic)."""
    from bilevel.nets.unet import augment

    xs = torch.stack(
        [
            augment(
                unet,
                aug_params,
                X,
                torch.randn((len(X), 1, *X.shape[2:]), generator=generator, dtype=torch.float64).to(X),
            )
            for _ in range(samples)
        ]
    )
    return float(xs.std(0).mean())


def run_one(a, method: str, seed: int, data, progress=None) -> dict:
    from bilevel.nets.unet import UNet, augment, augmenter_space, unet_init

    dtype, device = getattr(torch, a.dtype), torch.device(a.device)
    (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = data
    g = torch.Generator().manual_seed(seed)
    params, forward = _classifier(a.dataset, Xtr.shape[1:], g)
    params = {k: v.to(dtype=dtype, device=device) for k, v in params.items()}
    unet = UNet(Xtr.shape[1], a.unet_width, a.unet_depth).to(dtype=dtype, device=device)
    init = {k: v.to(dtype=dtype, device=device) for k, v in unet_init(unet, g).items()}
    scale = getattr(a, "unet_init_scale", 0.0)
    if scale > 0 and method != "none":  # torch's default (kaiming-uniform) range of the 1x1 output convolution
        bound = 1.0 / (init["out.weight"][0].numel() ** 0.5)
        for k in ("out.weight", "out.bias"):
            init[k] = scale * bound * (2 * torch.rand(init[k].shape, generator=g, dtype=torch.float64) - 1).to(init[k])
    space, raw = augmenter_space(init)
    reg_weight, reg_samples = getattr(a, "aug_reg", 0.0), getattr(a, "aug_reg_samples", 4)

    def loss(p, nat, ctx):
        # (x, y, eps) for training; (x, y, None[, eps_samples]) for validation: no augmentation of the images
        # the classifier sees, plus (with --aug-reg) the authors' regulariser of the augmenter
        x, y, eps = ctx[:3]
        out = F.cross_entropy(forward(p, x if eps is None else augment(unet, nat["augment"], x, eps)), y)
        if len(ctx) > 3 and ctx[3] is not None:
            out = out + reg_weight * augment_regulariser(unet, nat["augment"], x, ctx[3])
        return out

    losses: list[float] = []

    def train_batch():  # a random mini-batch and its augmentation noise, reused by the hypergradient
        idx = torch.randint(0, len(Xtr), (a.batch_size,), generator=g).to(device)
        x = Xtr[idx]
        eps = torch.randn((len(x), 1, *x.shape[2:]), generator=g, dtype=torch.float64).to(x)
        return x, Ytr[idx], eps

    def val_batch():  # a random validation mini-batch, not augmented (with --aug-reg: the regulariser's noise)
        vi = torch.randint(0, len(Xva), (a.batch_size,), generator=g).to(device)
        xv = Xva[vi]
        reg_eps = (
            torch.randn((reg_samples, len(xv), 1, *xv.shape[2:]), generator=g, dtype=torch.float64).to(xv)
            if reg_weight > 0 and method != "none"
            else None
        )
        return xv, Yva[vi], None, reg_eps

    class Watch:
        """The training losses."""

        def on_weight_step(self, tuner):
            losses.append(float(tuner.last_losses))

        def on_interval(self, tuner):
            if not tuner.tunes:  # "none" takes no hyperparameter step but draws (and drops) its validation
                val_batch()  # batch, so that every method draws the same training batches and noise

    rule = SGD(lr=a.lr, momentum=a.momentum)
    alg = algorithm1(params, raw, space, rule, loss, method, a.lookback, a.hyper_lr, a.interval, [Watch()])
    start, diverged = time.perf_counter(), None
    try:
        loop.run(alg, a.steps, train_batch, val_batch, schedule=loop.Every(a.interval), progress=progress)
    except NonFiniteError as e:
        diverged = e.step - 1  # the 0-based weight step that failed (or that a failing hyperparameter step followed)
    seconds = time.perf_counter() - start
    aug_params = space.natural(T.detach(alg.raw))["augment"]
    eg = torch.Generator().manual_seed(10_000 + seed)
    n_eval = a.eval_size
    res = {
        "seed": seed,
        "method": method,
        "seconds": seconds,
        "diverged_at": diverged,
        "final_train_loss": float(sum(losses[-50:]) / max(1, len(losses[-50:]))) if losses else None,
    }
    if diverged is None:
        for name, (X, Y) in (("val", (Xva, Yva)), ("test", (Xte[:n_eval], Yte[:n_eval]))):
            ev = evaluate(forward, alg.params, unet, aug_params, X, Y, a.aug_samples, eg)
            res.update({f"{name}_acc_aug": ev["acc_aug"], f"{name}_acc": ev["acc"], f"{name}_loss": ev["loss"]})
        res["augmenter_change"] = float(T.norm(T.add(aug_params, space.natural(raw)["augment"], -1.0)))
        res["augmentation_std"] = augmentation_std(unet, aug_params, Xva[:500], 8, eg)
        with torch.no_grad():  # accuracy on the (un-augmented) training images: how much the classifier over-fits
            res["train_acc"] = C.accuracy(C.batched_logits(forward, alg.params, Xtr), Ytr)
    return res, (unet, aug_params)


def _figure(unet, aug_params, X: Tensor, path: Path, n: int = 6, samples: int = 32, seed: int = 0) -> None:
    from matplotlib.figure import Figure

    from bilevel.nets.unet import augment

    g = torch.Generator().manual_seed(seed)
    x = X[:n]
    with torch.no_grad():
        outs = torch.stack(
            [
                augment(unet, aug_params, x, torch.randn((n, 1, *x.shape[2:]), generator=g, dtype=torch.float64).to(x))
                for _ in range(samples)
            ]
        )
    std = outs.std(0)
    fig = Figure(figsize=(6, 1.5 * n))
    cols = [("Original", x), ("Sample 1", outs[0]), ("Sample 2", outs[1]), ("Pixel std.", std)]
    for r in range(n):
        for c, (title, imgs) in enumerate(cols):
            ax = fig.add_subplot(n, 4, r * 4 + c + 1)
            img = imgs[r].detach().float().cpu()
            img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0).clamp(0, 1)
            ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)


def summarise(runs: list[dict], keys: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation over the non-diverged runs, and the number diverged."""
    import numpy as np

    ok = [r for r in runs if r.get("diverged_at") is None]
    out: dict[str, Any] = {"n": len(runs), "diverged": len(runs) - len(ok)}
    for k in keys:
        v = np.array([r[k] for r in ok if r.get(k) is not None], dtype=float)
        out[k] = {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else None}
    return out


def _print(doc: dict, keys: Sequence[tuple[str, str]], title: str, console=None, scale: float = 1.0) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title)
    t.add_column("method")
    for _, label in keys:
        t.add_column(label, justify="right")
    t.add_column("diverged", justify="right")
    for m, s in doc["summary"].items():
        cells = []
        for k, _ in keys:
            v = s[k]
            cells.append(
                "-"
                if v["mean"] is None
                else (f"{scale * v['mean']:.2f}" + (f" ± {scale * v['std']:.2f}" if v["std"] is not None else ""))
            )
        t.add_row(m, *cells, f"{s['diverged']}/{s['n']}")
    console.print(t)


def add_arguments(p) -> None:
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        choices=["fashion-mnist", "mnist", "cifar10"],
        help="cifar10 uses ResNet-18 (the paper's set-up; needs the data and a GPU)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument(
        "--seeds", type=C.positive_int, default=3, help="seeds per method (seed s of --seed S is S * 1_000_003 + s)"
    )
    p.add_argument("--steps", type=C.positive_int, default=1000, help="classifier SGD steps")
    p.add_argument("--interval", type=C.positive_int, default=5, help="weight steps between hyperparameter steps (T)")
    p.add_argument(
        "--lookback",
        type=C.nonnegative_int,
        default=3,
        help="K: Neumann steps (Neumann(steps=K) sums K + 1 terms of the series; 0 allowed) / unrolled "
        "steps (unroll needs K >= 1)",
    )
    C.add_deprecated_alias(p, "--terms", "--lookback", type=C.nonnegative_int)
    p.add_argument("--batch-size", type=C.positive_int, default=64, help="classifier mini-batch size")
    p.add_argument("--lr", type=C.positive_float, default=0.05, help="classifier SGD learning rate")
    p.add_argument("--momentum", type=C.unit_interval, default=0.9, help="classifier SGD momentum")
    p.add_argument("--hyper-lr", type=C.positive_float, default=1e-3, help="Adam learning rate of the U-Net weights")
    p.add_argument("--train-size", type=C.positive_int, default=2000, help="training images (a seeded subset)")
    p.add_argument("--val-size", type=C.positive_int, default=1000, help="validation images (a seeded subset)")
    p.add_argument("--eval-size", type=C.positive_int, default=2000, help="test images evaluated")
    p.add_argument(
        "--aug-samples", type=C.positive_int, default=10, help="augmented samples averaged at evaluation (E.3)"
    )
    p.add_argument(
        "--unet-width", type=C.positive_int, default=8, help="channels of the first U-Net level (doubled per level)"
    )
    p.add_argument("--unet-depth", type=C.positive_int, default=2, help="U-Net resolutions (levels)")
    p.add_argument(
        "--unet-init-scale",
        type=C.nonnegative_float,
        default=0.0,
        help="output convolution of the U-Net at this multiple of torch's default initialisation "
        "(0: zero, the identity; the authors' U-Net starts at 1)",
    )
    p.add_argument(
        "--aug-reg",
        type=C.nonnegative_float,
        default=0.0,
        help="weight of the authors' augmenter regulariser mean|E[x~]-x| - mean std(x~) in the validation "
        "loss (their reg_weight: 0 or 1)",
    )
    p.add_argument(
        "--aug-reg-samples", type=C.positive_int, default=4, help="noise draws of that regulariser (authors: 10)"
    )


def check_arguments(a) -> None:
    methods = C.check_names("--methods", C.names(a.methods), METHODS)
    if "unroll" in methods and a.lookback < 1:
        raise ValueError(
            f"--lookback {a.lookback}: unroll differentiates through --lookback weight steps, so it needs "
            "--terms >= 1 (0 is fine for neumann: one term)"
        )


def metrics_of(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``metrics.<method>``: mean and sd over seeds of the accuracies (10-augmented-sample versions as the
    headline ``val_accuracy`` / ``test_accuracy``, Lorraine et al. App. E.3; ``*_plain`` on the plain
    images) and the number of diverged seeds."""
    out = {}
    for m, s in summary.items():
        row: dict[str, Any] = {}
        for name, k in (
            ("val_accuracy", "val_acc_aug"),
            ("test_accuracy", "test_acc_aug"),
            ("val_accuracy_plain", "val_acc"),
            ("test_accuracy_plain", "test_acc"),
        ):
            row[name], row[f"{name}_sd"] = s[k]["mean"], s[k]["std"]
        out[m] = {**row, "diverged": s["diverged"], "seeds": s["n"]}
    return out


def _part_key(a, method: str, seed: int) -> dict:
    return settings_key(a, drop=("methods", "seeds"), method=method, run_seed=seed)


def main(a, progress_factory=None, console=None) -> dict:
    """Every (method, seed) run is one part (``out/parts/<method>-seed<seed>.json`` plus the learned augmenter
    in ``.pt``), keyed by the options that produced it: re-running the same command skips finished runs."""
    from bilevel.nets.unet import UNet

    check_arguments(a)
    methods = C.names(a.methods)
    out = Path(a.out)
    dtype, device = getattr(torch, a.dtype), torch.device(a.device)
    data = _load(a.dataset, a.data_dir, a.seed, a.train_size, a.val_size, dtype, device)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    start = time.perf_counter()
    fig_src, resumed = None, []
    for m in methods:
        advance = progress_factory(f"augment {m}", a.steps * a.seeds) if progress_factory else None
        for s in range(a.seeds):
            seed = derived_seed(a.seed, s)
            part, key = out / "parts" / f"{m}-seed{seed}.json", _part_key(a, m, seed)
            res, aug = load_part(part, key), None
            if res is not None:
                resumed.append(f"{m} seed {seed}")
                if advance:
                    advance(a.steps)
                pt = part.with_suffix(".pt")
                if fig_src is None and m != "none" and res["diverged_at"] is None:
                    state = load_torch_state(pt, "the augmentation figure uses another run")
                    if state is not None:
                        unet = UNet(data[0][0].shape[1], a.unet_width, a.unet_depth).to(dtype=dtype, device=device)
                        aug = (unet, {k: v.to(dtype=dtype, device=device) for k, v in state.items()})
            else:
                res, aug = run_one(a, m, seed, data, advance)
                if m != "none" and res["diverged_at"] is None:  # the augmenter, for the figure on resume
                    part.parent.mkdir(parents=True, exist_ok=True)
                    atomic_save(T.detach(aug[1]), part.with_suffix(".pt"))
                save_part(part, key, res)
            runs[m].append(res)
            if fig_src is None and m != "none" and res["diverged_at"] is None and aug is not None:
                fig_src = aug
    keys = [
        "val_acc_aug",
        "test_acc_aug",
        "val_acc",
        "test_acc",
        "test_loss",
        "seconds",
        "augmenter_change",
        "augmentation_std",
        "train_acc",
    ]
    summary = {m: summarise(r, keys) for m, r in runs.items()}
    doc = {
        "experiment": NAME,
        "dataset": a.dataset,
        "config": {k: v for k, v in vars(a).items() if isinstance(v, (int, float, str, bool))},
        "metrics": metrics_of(summary),
        "runs": runs,
        "summary": summary,
        "resumed": resumed,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(out / "results.json", doc, indent=1)
    if fig_src is not None:
        _figure(*fig_src, data[1][0], out / "augmentations.png")
    say_resumed(NAME, "run(s)", resumed, out / "parts", console)
    _print(
        doc,
        [
            ("val_acc_aug", "val acc % (10 aug.)"),
            ("test_acc_aug", "test acc % (10 aug.)"),
            ("val_acc", "val acc % (plain)"),
            ("test_acc", "test acc % (plain)"),
            ("train_acc", "train acc % (plain)"),
            ("augmentation_std", "aug. std x100"),
        ],
        f"Learned augmentation, {a.dataset} ({a.seeds} seeds, {a.steps} steps; neumann = {a.lookback} Neumann "
        f"steps ({a.lookback + 1} terms), unroll = {a.lookback} unrolled steps)",
        console,
        scale=100.0,
    )
    return doc
