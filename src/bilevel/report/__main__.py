"""``python -m bilevel.report results.json [OUT_DIR]``"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from .report import write_report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bilevel.report RESULTS [OUT_DIR]``: :func:`~bilevel.report.write_report`, printing the paths.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    ap = argparse.ArgumentParser(prog="python -m bilevel.report", description=__doc__)
    ap.add_argument("results", type=Path, help="results.json written by the experiment")
    ap.add_argument("out_dir", type=Path, nargs="?", help="default: alongside results.json")
    ap.add_argument("--baseline", default="random")
    ap.add_argument("--method", default="ours-wd-lr")
    a = ap.parse_args(argv)
    for p in write_report(a.results, a.out_dir or a.results.parent, baseline=a.baseline, method=a.method):
        print(p)


if __name__ == "__main__":
    main()
