"""Command line: ``bilevel demo``, ``bilevel run EXPERIMENT``, ``bilevel report DIR``, ``bilevel datasets``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()


@contextlib.contextmanager
def progress_bars():
    """Yield a factory ``(name, total) -> advance(n)`` drawing one rich progress bar per task (the display starts
    with the first bar, so a run that fails before training prints nothing but its error)."""
    bars: list[Progress] = []

    def factory(name: str, total: int):
        if not bars:
            bars.append(
                Progress(
                    TextColumn("{task.description:>18}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    transient=False,
                )
            )
            bars[0].start()
        bar = bars[0]
        task = bar.add_task(name, total=total)
        return lambda n=1: bar.advance(task, n)

    try:
        yield factory
    finally:
        if bars:
            bars[0].stop()


def experiments() -> dict[str, Any]:
    """``bilevel run NAME``: every module of ``bilevel_studies`` (in its per-paper subpackages
    ``clarke/``, ``lorraine/``, ``vicol/``, ...) that defines ``NAME`` is a command.

    Such a module also defines HELP, add_arguments(parser) and main(args, progress_factory, console), writes
    results.json, PNG figures and a printed table to --out, and keeps heavy imports inside its functions.
    It may define check_arguments(args), the checks across options (raising ``ValueError``), which runs
    before anything is written. Commands are listed in the order of their module names.
    """
    import bilevel_studies as package

    infos = [
        info
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")
        if not info.ispkg and info.name != __name__
    ]
    found = {}
    for info in sorted(infos, key=lambda m: (m.name.rsplit(".", 1)[-1], m.name)):
        module = importlib.import_module(info.name)
        if hasattr(module, "NAME"):
            if module.NAME in found:
                raise RuntimeError(
                    f"two study modules define NAME = {module.NAME!r}: "
                    f"{found[module.NAME].__name__} and {module.__name__}"
                )
            found[module.NAME] = module
    return found


#: the command line of the running command (written beside the run directory's lock, naming its holder)
_COMMAND: list[str] = []


def _command_line(prog: str) -> str:
    import shlex

    return " ".join(["bilevel", *map(shlex.quote, _COMMAND)]) if _COMMAND else prog


def _run_experiment(module, a: argparse.Namespace, prog: str) -> int:
    from bilevel.rundir import run_directory

    if hasattr(module, "check_arguments"):
        module.check_arguments(a)  # checks across options: ValueError before anything is written
    import contextlib

    from bilevel.callbacks import autolog

    live = autolog(a.tensorboard) if a.tensorboard is not None else contextlib.nullcontext()
    with run_directory(a.out, command=_command_line(prog)) as out:
        a.threads = _apply_threads(a.threads, out)  # results.json's config records the number used
        with progress_bars() as bars, live:
            module.main(a, progress_factory=bars, console=console)
    return 0


#: where a run directory keeps the thread count that ``--threads auto`` chose (reused on resume)
THREADS_FILE = ".threads"


def _apply_threads(spec: int | str | None, out: Path) -> int:
    """Set torch's threads from ``--threads`` (:mod:`bilevel.threads`). ``auto`` chooses once per run
    directory: the number is saved in ``OUT/.threads`` and a resumed run reuses it, so that a resume
    computes with the same threads (the last bits of a result can depend on them)."""
    import torch

    from bilevel.rundir import atomic_write_json, read_json_state
    from bilevel.threads import set_threads

    if spec in (None, "auto"):
        saved = read_json_state(
            out / THREADS_FILE, "threads are chosen again", check=lambda d: isinstance(d, dict) and "threads" in d
        )
        n = saved.get("threads") if isinstance(saved, dict) else None
        if isinstance(n, int) and n >= 1:
            torch.set_num_threads(n)
            return n
        n = set_threads("auto")
        atomic_write_json(out / THREADS_FILE, {"threads": n, "policy": "auto"})
        return n
    return set_threads(int(spec))


def _common(p: argparse.ArgumentParser) -> None:
    from . import _common as C

    p.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="write live TensorBoard curves (losses, every tuned hyperparameter; populations: median, "
        "quartiles and a few members) of every online loop of the run to DIR/loop-K (needs "
        "pip install tensorboard; view with tensorboard --logdir DIR)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (results.json, figures, checkpoints), used by one run at a time (a second "
        "run on it stops at once, naming the holder); re-running the same command there resumes an "
        "interrupted or killed run (at most the work since the last checkpoint or finished part is "
        "lost) and gives the same numbers as an uninterrupted run",
    )
    p.add_argument("--seed", type=C.seed, default=0, help=C.SEED_HELP)
    p.add_argument(
        "--data-dir",
        type=C.existing_dir,
        default=None,
        help="existing data directory (default: $BILEVEL_DATA, else ~/.cache/bilevel)",
    )
    p.add_argument(
        "--device",
        type=C.device,
        default="cpu",
        help="torch device, e.g. cpu or cuda (a resume may switch it; floating-point results may then differ "
        "in the last bits)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="floating-point precision")
    p.add_argument("--threads", type=C.threads, default="auto", help=C.THREADS_HELP)


def cmd_demo(a: argparse.Namespace) -> int:
    from bilevel.rundir import run_directory

    from .clarke import demo

    with run_directory(a.out, command=_command_line("bilevel demo")) as out:
        _apply_threads(a.threads, out)
        with progress_bars() as bars:
            demo.run(a.out, inits=a.inits, steps=a.steps, seed=a.seed, progress_factory=bars, console=console)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from bilevel.report import write_report

    path = a.dir / "results.json" if a.dir.is_dir() else a.dir
    if not path.exists():
        raise FileNotFoundError(f"no results.json at {path}")
    write_report(path, a.out or path.parent, console=console)
    return 0


def cmd_datasets(a: argparse.Namespace) -> int:
    from rich.table import Table

    from bilevel.data import DATASETS

    t = Table(title="data sets (load one with bilevel.data.load(NAME) or the loader shown)")
    for c in ("name", "kind", "loader", "description"):
        t.add_column(c, overflow="fold")
    for info in DATASETS.values():
        t.add_row(info.name, info.kind, info.loader_call, info.description)
    console.print(t)
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``bilevel run clarke: error: argument --steps: ...``
    (without the long usage block; ``--help`` shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bilevel",
        description="Gradient-based hyperparameter optimisation by "
        "implicit differentiation (Lorraine et al. 2020, Vicol et al. 2021, Clarke et al. 2022)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from . import _common as C

    p = sub.add_parser(
        "demo",
        help="one-pass tuning of lr, momentum and weight decay on scikit-learn's diabetes data "
        "against the same initialisations left fixed (about a minute on a CPU)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output directory (one run at a time; re-running resumes)"
    )
    p.add_argument("--inits", type=C.positive_int, default=16, help="random initialisations")
    p.add_argument("--steps", type=C.positive_int, default=1500, help="full-batch weight steps")
    p.add_argument("--seed", type=C.seed, default=0, help=C.SEED_HELP)
    p.add_argument("--threads", type=C.threads, default="auto", help=C.THREADS_HELP)
    p.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run an experiment").add_subparsers(dest="experiment", required=True)
    for name, module in experiments().items():
        p = run.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__.split("\n\n")[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        _common(p)
        module.add_arguments(p)
        p.set_defaults(func=lambda a, module=module, prog=p.prog: _run_experiment(module, a, prog))

    p = sub.add_parser("report", help="re-render the table and figures of a results.json")
    p.add_argument("dir", type=Path, help="run directory or results.json")
    p.add_argument("--out", type=Path, default=None, help="where to write figures (default: beside results.json)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("datasets", help="list the data sets the loaders know")
    p.set_defaults(func=cmd_datasets)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a damaged state file set aside, ...) as one line each."""
    console.print(
        f"[yellow]warning:[/] {escape(_one_line(message if isinstance(message, Warning) else Warning(message)))}",
        soft_wrap=True,
        highlight=False,
    )


#: errors that come from the options, the files or the machine, reported as one line ``error: ...`` (exit 2);
#: anything else is a bug and keeps its traceback. BILEVEL_DEBUG=1 shows the traceback of these too.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    from bilevel.rundir import DamagedFileWarning

    args = build_parser().parse_args(argv)
    _COMMAND[:] = list(sys.argv[1:] if argv is None else argv)
    from bilevel.allocator import keep_freed_memory

    keep_freed_memory()  # large temporaries without page faults (docs/benchmarks.md, "Population step")
    debug = os.environ.get("BILEVEL_DEBUG", "").strip() not in ("", "0")
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", DamagedFileWarning)  # a damaged file is always named
        return _dispatch(args, debug)


def _dispatch(args: argparse.Namespace, debug: bool) -> int:
    from bilevel.rundir import RunLocked

    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: progress is checkpointed; run the same command again to resume[/]")
        return 130
    except RunLocked as e:
        console.print(f"[red]error:[/] {escape(_one_line(e))}", soft_wrap=True, highlight=False)
        return 3
    except USER_ERRORS as e:
        if debug:
            raise
        console.print(f"[red]error:[/] {escape(_one_line(e))}", soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
