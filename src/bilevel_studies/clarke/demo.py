"""The README's main job: one-pass tuning on scikit-learn's diabetes data (ships with scikit-learn).

Random initialisations of learning rate, weight decay and momentum (Clarke et al.
Table 5 ranges) are trained twice -- left fixed (``random``) and tuned online by
IFT hypergradients (``ours-wd-lr-m``) -- and compared by final test MSE. Checkpointed every
250 steps: re-running the same command after an interruption resumes it.
"""

from __future__ import annotations

from pathlib import Path

from bilevel.report import write_report

from .config import ClarkeConfig
from .reporting import divergence_notes
from .running import run_experiment


def run(out: Path, inits: int = 16, steps: int = 1500, seed: int = 0, progress_factory=None, console=None) -> dict:
    cfg = ClarkeConfig(
        dataset="diabetes",
        methods=["random", "ours-wd-lr-m"],
        inits=inits,
        steps=steps,
        seed=seed,
        checkpoint_every=min(steps, 250),
    )
    doc = run_experiment(cfg, Path(out), progress_factory=progress_factory)
    write_report(doc, Path(out), console=console)
    if console is not None:
        for line in divergence_notes(doc):
            console.print(f"note: {line}", soft_wrap=True, markup=False)
    return doc
