"""Command line: ``bilevel demo``, ``bilevel run EXPERIMENT``, ``bilevel report DIR``, ``bilevel datasets``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()


@contextlib.contextmanager
def progress_bars():
    """Yield a factory ``(name, total) -> advance(n)`` drawing one rich progress bar per task."""
    with Progress(TextColumn("{task.description:>18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        def factory(name: str, total: int):
            task = bar.add_task(name, total=total)
            return lambda n=1: bar.advance(task, n)
        yield factory


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output directory (results.json, figures, checkpoints); "
                   "re-running the same command there resumes an interrupted run")
    p.add_argument("--seed", type=int, default=0, help="seed of the first initialisation (init i uses seed + i)")
    p.add_argument("--data-dir", default=None, help="data directory (default: $BILEVEL_DATA, else ~/.cache/bilevel)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="floating-point precision")


def _clarke_args(p: argparse.ArgumentParser, *, dataset: str, inits: int, steps: int, methods: str) -> None:
    from .experiments.clarke import METHODS
    p.add_argument("--dataset", default=dataset, help="energy, boston, concrete, kin8nm, naval, power, wine, yacht, "
                   "fashion-mnist, mnist, diabetes, digits")
    p.add_argument("--methods", default=methods, help=f"comma-separated from {', '.join(METHODS)}, or 'all'")
    p.add_argument("--inits", type=int, default=inits, help="random hyperparameter initialisations per method")
    p.add_argument("--steps", type=int, default=steps, help="weight updates (full-batch epochs for UCI)")
    p.add_argument("--interval", type=int, default=10, help="T: weight steps between hyperparameter steps")
    p.add_argument("--lookback", type=int, default=5, help="i: Neumann terms / unrolled steps")
    p.add_argument("--hyper-lr", type=float, default=0.05, help="Adam learning rate on the hyperparameters")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: full batch; 50 for images)")
    p.add_argument("--val-fraction", type=float, default=None, help="UCI: validation share of train+validation")
    p.add_argument("--hidden", type=int, default=50, help="hidden units of the MLP")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")


def _clarke_config(a: argparse.Namespace):
    from .data import DATASETS, dataset_name
    from .experiments.clarke import ClarkeConfig
    name = dataset_name(a.dataset)
    bs = a.batch_size if a.batch_size is not None else (50 if DATASETS[name].kind == "classification" and
                                                       name != "digits" else None)
    return ClarkeConfig(dataset=name, methods=a.methods, inits=a.inits, steps=a.steps, seed=a.seed,
                        interval=a.interval, lookback=a.lookback, hyper_lr=a.hyper_lr, hidden=a.hidden,
                        batch_size=bs, val_fraction=a.val_fraction, checkpoint_every=a.checkpoint_every,
                        data_dir=a.data_dir, device=a.device, dtype=a.dtype)


def cmd_clarke(a: argparse.Namespace) -> int:
    from .experiments import clarke
    from .report import write_report
    cfg = _clarke_config(a)
    with progress_bars() as bars:
        doc = clarke.run(cfg, a.out, progress_factory=bars)
    write_report(doc, a.out, console=console)
    console.print(f"results: {a.out / 'results.json'}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .experiments import demo
    with progress_bars() as bars:
        demo.run(a.out, inits=a.inits, steps=a.steps, seed=a.seed, progress_factory=bars, console=console)
    return 0


def cmd_sensitivity(a: argparse.Namespace) -> int:
    from .experiments import sensitivity
    cfg = _clarke_config(a)
    intervals = [int(x) for x in a.intervals.split(",")]
    lookbacks = [int(x) for x in a.lookbacks.split(",")]
    with progress_bars() as bars:
        sensitivity.run(cfg, intervals, lookbacks, a.out, progress_factory=bars, console=console)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report
    path = a.dir / "results.json" if a.dir.is_dir() else a.dir
    if not path.exists():
        raise FileNotFoundError(f"no results.json at {path}")
    write_report(path, a.out or path.parent, console=console)
    return 0


def cmd_datasets(a: argparse.Namespace) -> int:
    from rich.table import Table
    from .data import DATASETS
    t = Table(title="data sets")
    for c in ("name", "kind", "description"):
        t.add_column(c)
    for info in DATASETS.values():
        t.add_row(info.name, info.kind, info.description)
    console.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel", description="Gradient-based hyperparameter optimisation by "
                                     "implicit differentiation (Lorraine et al. 2020, Vicol et al. 2021, Clarke et al. 2022)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="one-pass tuning of lr, momentum and weight decay on scikit-learn's diabetes data "
                       "against the same initialisations left fixed (about a minute on a CPU)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--inits", type=int, default=16, help="random initialisations")
    p.add_argument("--steps", type=int, default=1500, help="full-batch weight steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the first initialisation")
    p.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run an experiment").add_subparsers(dest="experiment", required=True)
    p = run.add_parser("clarke", help="Clarke et al. 2022 sec. 4: random vs one-pass tuned SGD hyperparameters")
    _common(p)
    _clarke_args(p, dataset="energy", inits=40, steps=4000, methods="random,ours-wd-lr-m")
    p.set_defaults(func=cmd_clarke)

    p = run.add_parser("sensitivity", help="Clarke et al. Fig. 4: median final test loss over update interval T and "
                       "look-back i, for random and ours-wd-lr-m")
    _common(p)
    _clarke_args(p, dataset="energy", inits=20, steps=400, methods="random,ours-wd-lr-m")
    p.add_argument("--intervals", default="1,5,10,25,50", help="comma-separated update intervals T")
    p.add_argument("--lookbacks", default="0,1,5,10,25", help="comma-separated look-back distances i")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("report", help="re-render the table and figures of a results.json")
    p.add_argument("dir", type=Path, help="run directory or results.json")
    p.add_argument("--out", type=Path, default=None, help="where to write figures (default: beside results.json)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("datasets", help="list the data sets the loaders know")
    p.set_defaults(func=cmd_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: progress is checkpointed; run the same command again to resume[/]")
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
