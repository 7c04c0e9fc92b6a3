"""Before/after check of the studies: run one small, fast configuration of every study, then compare the numbers.

A standalone script (it never imports ``bilevel``; the library never imports it). It runs each study's command
line through a given command prefix, one study after another, each into ``ROOT/<study>/`` (a fresh directory:
re-running a study's command in an existing ``--out`` would resume it and read finished parts back), and writes
``ROOT/manifest.json`` (commands, exit codes, wall times, which ``bilevel`` was imported) and ``ROOT/<study>.log``.
``compare`` then walks every numeric leaf of both ``results.json`` files and prints a markdown table.

Record the numbers of the pre-redesign commit (a pristine worktree, its sources first on PYTHONPATH)::

    git worktree add /tmp/before <commit>
    python benchmarks/studies_before_after.py run --src /tmp/before/src --out /tmp/before_runs

and of the current tree (the installed console script), then compare::

    python benchmarks/studies_before_after.py run --cli /work/main/.venv/bin/bilevel --out /tmp/after_runs
    python benchmarks/studies_before_after.py compare /tmp/before_runs /tmp/after_runs [--markdown table.md]

``--cli`` (alias ``--python-cmd``) takes any command prefix, split like a shell would; ``--src DIR`` is short for
``--cli "env PYTHONPATH=DIR PYTHON -c 'from bilevel_studies.cli import main; ...'" --cwd DIR/..``
and also checks that ``bilevel`` then resolves under DIR (an editable install of another tree must not win).
Ray Tune's workers (asha-pbt) inherit PYTHONPATH, so they import the same tree.

``compare --deep`` compares every JSON file under each study's directory (parts/, methods/, sensitivity's
per-cell runs; Ray Tune's own ray/ excluded), keyed by relative file path: finer, but files that the redesign
renames show up as missing/added keys. Other ``run`` options: ``--only clarke,demo`` (a subset), ``--overwrite``
(replace existing study directories), ``--timeout`` (seconds per study, default 600), ``--cwd`` (working directory
of the commands; with ``--src`` its parent).
``list`` prints the commands. Every command gets ``--seed 0`` and ``--threads 1`` (``demo`` has no --threads
option), and every run gets ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ``MPLBACKEND=Agg`` and ``BILEVEL_DATA``
(default /work/shared/data, or the environment's). Each configuration runs in 5-55 s on one CPU thread of a
2-core Xeon (about 7 minutes for all 14 on a loaded machine, under 5 on an idle one).

``compare`` skips timing leaves (a dict key on the path containing ``seconds``, ``time``, ``elapsed`` or ``wall``,
case-insensitive); numbers are ints, floats, bools and nulls (NaN equals NaN; a null against a number differs).
Keys missing/added are numeric leaves present only in BEFORE / only in AFTER; a leaf that is numeric on one side
and not on the other counts as compared and differing. Non-numeric leaves (strings) that differ are listed below
the table but do not count (Ray Tune's trial ids in asha-pbt's PBT mutations, e.g. ``d49ba_00003``, are random
per run). Exit status 0 only when every study ran on both sides, every compared number is
identical and no numeric key is missing from AFTER (added keys are reported but allowed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# study -> arguments after "run STUDY" (or "demo"); --out, --seed and --threads are added by the script.
# Wall times on an idle 2-core Xeon, one torch thread: see the comments.
STUDIES: dict[str, list[str]] = {
    "demo": ["--inits", "8", "--steps", "1000"],  # ~10 s
    "anti-distill": [],  # defaults, ~20 s
    "asha-pbt": [
        "--inits",
        "4",
        "--steps",
        "200",
        "--perturbation-interval",
        "50",  # ~30 s (Ray start-up
        "--ray-cpus",
        "1",
    ],  # included); 1 exploit
    "augment": [
        "--seeds",
        "2",
        "--steps",
        "60",
        "--train-size",
        "1000",
        "--val-size",
        "500",
        "--eval-size",
        "1000",
        "--aug-samples",
        "2",
    ],  # ~30 s
    "bayesopt": ["--repeats", "2", "--samples", "12", "--startup", "4", "--steps", "500"],  # ~12 s
    "clarke": ["--inits", "10", "--steps", "2000"],  # ~20 s
    "distill": [],  # defaults, ~10 s
    "inverse-study": [],  # defaults, ~7 s
    "lstm": ["--steps", "20", "--eval-windows", "20", "--overfit-steps", "40"],  # ~27 s
    "overfit-validation": ["--iterations", "300", "--test-size", "2000"],  # ~20 s
    "param-space": [],  # defaults, ~5 s
    "rings": ["--steps", "1500"],  # ~25 s
    "sensitivity": ["--inits", "4", "--steps", "200"],  # ~35 s
    "val-split": ["--pool", "2000", "--iterations", "300", "--test-size", "2000"],  # ~25 s
}
NO_THREADS_OPTION = {"demo"}
SEED = 0
TIMING_WORDS = ("seconds", "time", "elapsed", "wall")
CLI_MAIN = "import sys; from bilevel_studies.cli import main; sys.exit(main())"


def study_argv(name: str) -> list[str]:
    """The command line after the prefix, without --out."""
    head = ["demo"] if name == "demo" else ["run", name]
    threads = [] if name in NO_THREADS_OPTION else ["--threads", "1"]
    return [*head, *STUDIES[name], "--seed", str(SEED), *threads]


# ----------------------------------------------------------------------------------------------------------- run
def _split_env(prefix: list[str]) -> tuple[dict[str, str], list[str]]:
    """``env K=V ... cmd ...`` -> ({K: V}, [cmd, ...]); other prefixes unchanged."""
    env: dict[str, str] = {}
    rest = list(prefix)
    if rest and os.path.basename(rest[0]) == "env":
        rest = rest[1:]
        while rest and "=" in rest[0] and not rest[0].startswith("-"):
            k, v = rest.pop(0).split("=", 1)
            env[k] = v
    return env, rest


def _interpreter(cmd: list[str]) -> str | None:
    """The Python interpreter behind a command prefix: the program itself when it is a python, else the
    shebang of a console script."""
    if not cmd:
        return None
    prog = shutil.which(cmd[0]) or cmd[0]
    if "python" in os.path.basename(prog):
        return prog
    try:
        with open(prog, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
    except OSError:
        return None
    if first.startswith("#!"):
        parts = first[2:].split()
        if parts and os.path.basename(parts[0]) == "env" and len(parts) > 1:
            return shutil.which(parts[1])
        return parts[0] if parts else None
    return None


def which_bilevel(prefix: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Which ``bilevel`` (and ``bilevel.cli``) the prefix's interpreter imports, with the prefix's environment."""
    extra, cmd = _split_env(prefix)
    py = _interpreter(cmd)
    if py is None:
        return {"error": f"cannot tell the interpreter of {prefix!r}"}
    code = (
        "import importlib, json, bilevel\n"
        "found = {'bilevel': bilevel.__file__, 'version': getattr(bilevel, '__version__', None)}\n"
        "for m in ('bilevel.cli', 'bilevel_studies.cli', 'bilevel_studies'):\n"
        "    try:\n"
        "        found[m] = importlib.import_module(m).__file__\n"
        "    except ImportError:\n"
        "        pass\n"
        "print(json.dumps(found))"
    )
    p = subprocess.run([py, "-c", code], env={**env, **extra}, cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        return {"python": py, "error": p.stderr.strip()[-2000:]}
    return {"python": py, **json.loads(p.stdout.strip().splitlines()[-1])}


def git_state(path: Path) -> dict:
    def git(*a):
        p = subprocess.run(["git", "-C", str(path), *a], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": len((git("status", "--porcelain") or "").splitlines())}


def cmd_run(a: argparse.Namespace) -> int:
    if (a.cli is None) == (a.src is None):
        sys.exit("give exactly one of --cli PREFIX or --src DIR")
    if a.src is not None:
        src = Path(a.src).resolve()
        prefix = ["env", f"PYTHONPATH={src}", a.python, "-c", CLI_MAIN]
        cwd = Path(a.cwd).resolve() if a.cwd else src.parent
        expect = src
    else:
        prefix = shlex.split(a.cli)
        cwd = Path(a.cwd).resolve() if a.cwd else Path.cwd()
        expect = None
    names = list(STUDIES) if not a.only else [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        sys.exit(f"unknown studies {unknown}; known: {', '.join(STUDIES)}")
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "BILEVEL_DATA": os.environ.get("BILEVEL_DATA", "/work/shared/data"),
        "PYTHONHASHSEED": "0",
    }

    imported = which_bilevel(prefix, env, cwd)
    print(f"prefix: {shlex.join(prefix)}\ncwd: {cwd}\nimports: {json.dumps(imported)}", flush=True)
    if "error" in imported:
        sys.exit("cannot import bilevel with that prefix")
    if expect is not None and not Path(imported["bilevel"]).resolve().is_relative_to(expect):
        sys.exit(f"bilevel resolves to {imported['bilevel']}, not under {expect}")
    source = Path(imported["bilevel"]).resolve().parent

    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"studies": {}}
    manifest.update(
        {
            "prefix": prefix,
            "cwd": str(cwd),
            "imports": imported,
            "git": git_state(source),
            "bilevel_data": env["BILEVEL_DATA"],
            "threads_env": {"OMP_NUM_THREADS": "1"},
        }
    )
    for name in names:
        out = root / name
        if out.exists():
            if not a.overwrite:
                print(f"{name}: {out} exists (use --overwrite, or another --out); skipped", flush=True)
                continue
            shutil.rmtree(out)
        argv = [*study_argv(name), "--out", str(out)]
        log = root / f"{name}.log"
        print(f"{name}: {shlex.join(argv)}", end=" ... ", flush=True)
        t = time.perf_counter()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(
                    [*prefix, *argv], env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout
                ).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                rc, status = None, f"timed out after {a.timeout} s"
        wall = time.perf_counter() - t
        if rc == 0 and not (out / "results.json").exists():
            status = "ok but no results.json"
        print(f"{status}, {wall:.1f} s", flush=True)
        manifest["studies"][name] = {
            "argv": argv,
            "command": shlex.join([*prefix, *argv]),
            "status": status,
            "returncode": rc,
            "wall_seconds": round(wall, 2),
            "log": str(log),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        manifest_path.write_text(json.dumps(manifest, indent=1))
    bad = [n for n in names if manifest["studies"].get(n, {}).get("status", "ok") != "ok"]
    if bad:
        print(f"not ok: {', '.join(bad)}")
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------------- compare
def is_timing(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in TIMING_WORDS)


def leaves(x, path: str = "", skipped: list | None = None) -> dict[str, object]:
    """Flatten a JSON document to {path: leaf}; dict keys naming timings are dropped (counted in ``skipped``)."""
    found: dict[str, object] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            if is_timing(str(k)):
                if skipped is not None:
                    skipped.append(f"{path}/{k}")
                continue
            found.update(leaves(v, f"{path}/{k}", skipped))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            found.update(leaves(v, f"{path}[{i}]", skipped))
    else:
        found[path or "/"] = x
    return found


def is_number(v) -> bool:
    return v is None or isinstance(v, (bool, int, float))


def diff(a, b) -> tuple[bool, float, float]:
    """(identical, abs diff, rel diff) of two numeric leaves."""
    if a is None or b is None:
        return (
            (a is None and b is None),
            (0.0 if a is None and b is None else math.inf),
            (0.0 if a is None and b is None else math.inf),
        )
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        same = math.isnan(a) and math.isnan(b)
        return same, (0.0 if same else math.inf), (0.0 if same else math.inf)
    if a == b:
        return True, 0.0, 0.0
    d = abs(a - b)
    scale = max(abs(a), abs(b))
    return False, d, (d / scale if scale else math.inf)


def compare_docs(before: dict, after: dict) -> dict:
    sk_b: list = []
    sk_a: list = []
    lb, la = leaves(before, skipped=sk_b), leaves(after, skipped=sk_a)
    nb = {k for k, v in lb.items() if is_number(v)}
    na = {k for k, v in la.items() if is_number(v)}
    compared, identical, max_abs, max_rel = 0, 0, 0.0, 0.0
    worst: list[tuple[float, str, object, object]] = []
    for k in sorted((nb & set(la)) | (na & set(lb))):
        compared += 1
        if is_number(lb[k]) and is_number(la[k]):
            same, d, r = diff(lb[k], la[k])
        else:
            same, d, r = False, math.inf, math.inf
        if same:
            identical += 1
        else:
            worst.append((r, k, lb[k], la[k]))
        max_abs, max_rel = max(max_abs, d), max(max_rel, r)
    missing = sorted(nb - set(la))
    added = sorted(na - set(lb))
    strings = sorted(k for k in set(lb) & set(la) if not is_number(lb[k]) and not is_number(la[k]) and lb[k] != la[k])
    worst.sort(key=lambda t: (-t[0] if not math.isnan(t[0]) else 0, t[1]))
    return {
        "compared": compared,
        "identical": identical,
        "max_abs": max_abs,
        "max_rel": max_rel,
        "missing": missing,
        "added": added,
        "worst": worst,
        "strings": strings,
        "string_pairs": {k: (lb[k], la[k]) for k in strings},
        "skipped_timing": len(sk_b),
    }


def _relocate(x, old: str, new: str):
    """Strings naming the run's own directory, with that directory written ROOT/<study> (so --out differs not)."""
    if isinstance(x, dict):
        return {k: _relocate(v, old, new) for k, v in x.items()}
    if isinstance(x, list):
        return [_relocate(v, old, new) for v in x]
    return x.replace(old, new) if isinstance(x, str) else x


def _fmt(x: float) -> str:
    return "0" if x == 0 else ("inf" if math.isinf(x) else f"{x:.3g}")


def _short(v, n: int = 60) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def cmd_compare(a: argparse.Namespace) -> int:
    roots = [Path(a.before), Path(a.after)]
    manifests = []
    for r in roots:
        m = r / "manifest.json"
        manifests.append(json.loads(m.read_text()) if m.exists() else {"studies": {}})
    names = list(STUDIES) + sorted({n for m in manifests for n in m["studies"]} - set(STUDIES))
    lines = [
        "| study | command | numbers compared | identical | max abs diff | max rel diff | keys missing/added |",
        "|---|---|---|---|---|---|---|",
    ]
    details: list[str] = []
    ok = True
    for name in names:
        ran = [m["studies"].get(name) for m in manifests]
        argvs = [(i or {}).get("argv") for i in ran]
        shown = [[*v[:-2], "--out", f"ROOT/{name}"] if v and v[-2] == "--out" else v for v in argvs]
        default = [*study_argv(name), "--out", f"ROOT/{name}"] if name in STUDIES else [name]
        known = [v for v in shown if v] or [default]
        cmd = ("bilevel " + shlex.join(known[0])).replace("|", "\\|")
        problems = []
        if len(known) == 2 and known[0] != known[1]:
            problems.append(f"commands differ: after ran `{shlex.join(known[1])}`")
        docs = []
        for side, r, info in zip(("before", "after"), roots, ran):
            path = r / name / "results.json"
            status = (info or {}).get("status", "not run")
            if status != "ok" or not path.exists():
                problems.append(f"{side}: {status if status != 'ok' else 'no results.json'}")
                docs.append(None)
            else:
                doc = (
                    json.loads(path.read_text())
                    if not a.deep
                    else {
                        str(f.relative_to(r / name)): json.loads(f.read_text())
                        for f in sorted((r / name).rglob("*.json"))
                        if "ray" not in f.relative_to(r / name).parts
                    }
                )
                docs.append(_relocate(doc, str(r.resolve() / name), f"ROOT/{name}"))
        walls = " / ".join(f"{(i or {}).get('wall_seconds', '-')}" for i in ran)
        if problems:
            ok = False
            lines.append(f"| {name} | `{cmd}` | - | - | - | - | {'; '.join(problems)} |")
            continue
        c = compare_docs(*docs)
        mark = "" if c["identical"] == c["compared"] else " **DIFF**"
        ok &= c["identical"] == c["compared"] and not c["missing"]
        lines.append(
            f"| {name} | `{cmd}` | {c['compared']} | {c['identical']}{mark} | {_fmt(c['max_abs'])} | "
            f"{_fmt(c['max_rel'])} | {len(c['missing'])} / {len(c['added'])} |"
        )
        part = []
        if c["worst"]:
            part.append(f"differing numbers ({len(c['worst'])}), largest relative first:")
            part += [f"  {k}: {_short(x)} -> {_short(y)} (rel {_fmt(r)})" for r, k, x, y in c["worst"][: a.show]]
        if c["missing"]:
            part.append(f"missing in after ({len(c['missing'])}): " + ", ".join(c["missing"][: a.show]))
        if c["added"]:
            part.append(f"added in after ({len(c['added'])}): " + ", ".join(c["added"][: a.show]))
        if c["strings"]:
            part.append(f"non-numeric leaves that differ ({len(c['strings'])}, not counted):")
            part += [
                f"  {k}: {_short(c['string_pairs'][k][0])} -> {_short(c['string_pairs'][k][1])}"
                for k in c["strings"][: a.show]
            ]
        part.append(f"timing leaves skipped: {c['skipped_timing']}; wall s before / after: {walls}")
        details += [f"### {name}", "", "```", *part, "```", ""]
    heads = []
    for side, m in zip(("before", "after"), manifests):
        imp, git = m.get("imports", {}), m.get("git", {})
        cli = imp.get("bilevel.cli") or imp.get("bilevel_studies.cli") or imp.get("cli", "?")
        heads.append(
            f"* {side}: bilevel from `{imp.get('bilevel', '?')}` (cli `{cli}`), "
            f"commit {git.get('commit', '?')}, {git.get('dirty_files', '?')} uncommitted files"
        )
    text = "\n".join([*heads, "", *lines, "", *details])
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    return 0 if ok else 1


def cmd_list(a: argparse.Namespace) -> int:
    for name in STUDIES:
        print("bilevel " + shlex.join([*study_argv(name), "--out", f"ROOT/{name}"]))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the small configuration of every study into --out")
    p.add_argument(
        "--cli",
        "--python-cmd",
        dest="cli",
        default=None,
        help="command prefix that behaves like the `bilevel` console script (shell-split)",
    )
    p.add_argument("--src", default=None, help="instead of --cli: a source tree (.../src) put first on PYTHONPATH")
    p.add_argument("--python", default=sys.executable, help="interpreter for --src (default: this one)")
    p.add_argument("--cwd", default=None, help="working directory of the commands")
    p.add_argument("--out", required=True, help="output root: ROOT/<study>/, ROOT/<study>.log, ROOT/manifest.json")
    p.add_argument("--only", default=None, help="comma-separated subset of the studies")
    p.add_argument("--overwrite", action="store_true", help="delete and re-run studies whose directory exists")
    p.add_argument("--timeout", type=float, default=600, help="seconds per study")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="compare the results.json of two output roots")
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--markdown", default=None, help="also write the report to this file")
    p.add_argument("--show", type=int, default=10, help="differing keys listed per study")
    p.add_argument(
        "--deep",
        action="store_true",
        help="compare every *.json under each study's directory (parts/, "
        "methods/, sensitivity's cells; not Ray Tune's ray/), keyed by file, instead of results.json only",
    )
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("list", help="print the commands")
    p.set_defaults(func=cmd_list)
    a = ap.parse_args()
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
