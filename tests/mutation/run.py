"""Mutation testing: plant each mutant of ``mutants.py`` in a copy of the project, run the tests
that must kill it, and report which did.

    .venv/bin/python -m tests.mutation.run               # everything (see README.md for the time)
    .venv/bin/python -m tests.mutation.run -j 2          # two mutants at a time
    .venv/bin/python -m tests.mutation.run --only ID...  # some mutants (and their baselines)
    .venv/bin/python -m tests.mutation.run --list        # the catalog
    .venv/bin/python -m tests.mutation.run --check       # every snippet occurs once; runs no test
    .venv/bin/python -m tests.mutation.run --markdown tests/mutation/results.md

(``python tests/mutation/run.py ...`` works the same.) The working tree is never modified:

1. A snapshot of the project is laid out like an installed package under a temporary folder:
   ``site/fastopt/`` is ``fastopt/`` with ``site/fastopt/kernels/`` = ``kernels/`` (the setuptools
   ``package-dir`` mapping), beside ``tests/`` and ``pyproject.toml``. Each run copies it, plants
   at most one mutant, and starts pytest there with ``site/`` first on ``PYTHONPATH`` and a fresh,
   empty ``NUMBA_CACHE_DIR`` (numba's cache does not notice a change in an inlined function of
   another file, so a reused cache could let a mutant survive falsely).
2. A small pytest plugin (``-p mutation_guard``, written into the copy) checks in the test
   process itself that ``fastopt``, ``fastopt.kernels`` and ``fastopt.reference`` were imported
   from the copy (not through the editable install from the working tree) and that numba caches
   into the fresh folder; otherwise the run stops with an error.
3. Every distinct selection first runs on the unmutated copy and must pass, else nothing else runs.
4. Each mutant: pytest exit status 1 (a test failed) is *killed*, 0 is *survived*, anything else
   (a crash, a timeout, a usage error, no tests collected, a guard failure, or a failure caused
   only by a compile, syntax or name error) is *error*. The exit status of this script is 0 only
   when every mutant was killed. Logs of survivors and errors go to ``--log-dir``.

Tests under ``tests/cudasim`` are not used: the mutants are in the numba CPU kernels and the
NumPy reference only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mutants as catalog  # noqa: E402  (a sibling module, found through the line above)

DEFAULT_LOG_DIR = ROOT / "build" / "mutation"
DEFAULT_TIMEOUT = 900.0

# A failure whose output shows one of these was caused by the mutant not compiling or not being
# valid Python, which proves nothing about the tests: reported as an error, not a kill.
BROKEN = re.compile(r"\b(TypingError|LoweringError|UnsupportedError|NumbaError|SyntaxError|"
                    r"IndentationError|NameError|UnboundLocalError|ImportError)\b")

GUARD = '''\
"""Written by tests/mutation/run.py: stop the run unless fastopt comes from this copy."""
import os

import pytest


def pytest_configure(config):
    import numba

    import fastopt
    import fastopt.kernels
    import fastopt.kernels.numba_cpu
    import fastopt.reference

    root = os.path.realpath(os.environ["FASTOPT_MUTATION_COPY"])
    lines = []
    problems = []
    for module in (fastopt, fastopt.kernels, fastopt.kernels.numba_cpu, fastopt.reference):
        path = os.path.realpath(module.__file__)
        lines.append(f"{module.__name__} {path}")
        if not path.startswith(root + os.sep):
            problems.append(f"{module.__name__} imported from {path}, outside the copy {root}")
    cache = os.path.realpath(numba.config.CACHE_DIR or "")
    lines.append(f"NUMBA_CACHE_DIR {cache}")
    if cache != os.path.realpath(os.environ["NUMBA_CACHE_DIR"]) or not cache.startswith(root + os.sep):
        problems.append(f"numba caches into {cache!r}, not the copy's fresh folder")
    with open(os.path.join(root, "guard.txt"), "w") as f:
        f.write("\\n".join(lines + [f"PROBLEM {p}" for p in problems]) + "\\n")
    if problems:
        pytest.exit("mutation guard: " + "; ".join(problems), returncode=3)
'''


# ---------------------------------------------------------------------------------------------
# the catalog


def check_catalog(root: Path = ROOT) -> list[str]:
    """Problems with the catalog against the tree at ``root`` (empty when all is well): unknown
    selections or categories, duplicate ids, snippets not found exactly once, mutants that leave
    the file unchanged or no longer valid Python, selections naming missing test files."""
    problems = []
    seen = set()
    for m in catalog.MUTANTS:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        if m.category not in catalog.CATEGORIES:
            problems.append(f"{m.id}: unknown category {m.category!r}")
        if m.area not in catalog.AREAS:
            problems.append(f"{m.id}: unknown area {m.area!r}")
        if m.selection not in catalog.SELECTIONS:
            problems.append(f"{m.id}: unknown selection {m.selection!r}")
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.id}: no file {m.file}")
            continue
        source = path.read_text()
        count = source.count(m.original)
        if count != 1:
            problems.append(f"{m.id}: the snippet occurs {count} times in {m.file} (must be once)")
            continue
        if m.original == m.replacement:
            problems.append(f"{m.id}: the replacement equals the snippet")
        try:
            compile(source.replace(m.original, m.replacement), m.file, "exec")
        except SyntaxError as e:
            problems.append(f"{m.id}: the mutated file is not valid Python: {e}")
    for name, selection in catalog.SELECTIONS.items():
        for f in selection.files:
            if not (root / f).is_file():
                problems.append(f"selection {name}: no test file {f}")
    return problems


# ---------------------------------------------------------------------------------------------
# copies


def _ignore(directory, names):
    return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".nbi", ".nbc"))}


def make_snapshot(workdir: Path) -> Path:
    """The project laid out like an installed package, plus its tests and the guard plugin."""
    base = workdir / "snapshot"
    site = base / "site"
    shutil.copytree(ROOT / "fastopt", site / "fastopt", ignore=_ignore)
    shutil.copytree(ROOT / "kernels", site / "fastopt" / "kernels", ignore=_ignore)
    shutil.copytree(ROOT / "tests", base / "tests", ignore=_ignore)
    shutil.copy2(ROOT / "pyproject.toml", base / "pyproject.toml")
    (site / "mutation_guard.py").write_text(GUARD)
    return base


def in_copy(file: str) -> str:
    """Where a repository file lies in a copy."""
    if file.startswith("kernels/"):
        return "site/fastopt/" + file
    if file.startswith("fastopt/"):
        return "site/" + file
    return file


@dataclass
class Outcome:
    name: str  # a mutant id, or "baseline:<selection>"
    verdict: str  # killed / survived / error (mutants); passed / error (baselines)
    seconds: float
    returncode: int | None
    detail: str = ""  # the first failing test, or what went wrong
    reason: str = ""  # why that test failed (pytest's one-line summary)
    log: str = ""  # the whole output, kept for the log file
    command: list = field(default_factory=list)


def _broken(output: str):
    """The compile/syntax/name error behind a failure, if the failure reports one (searched in the
    traceback lines "E   ..." and the summary lines "FAILED/ERROR ... - ...", not in skip reasons)."""
    for line in output.splitlines():
        if line.startswith(("E ", "FAILED ", "ERROR ")):
            found = BROKEN.search(line)
            if found:
                return found
    return None


def _first_failure(output: str) -> tuple[str, str]:
    """The first failing test's id (from the ``-ra`` summary) and the start of its error message
    (the first "E   " lines of its traceback)."""
    lines = output.splitlines()
    message = " ".join(line[1:].strip() for line in lines if line.startswith("E ") and line[1:].strip())
    for line in lines:
        if line.startswith(("FAILED ", "ERROR ")):
            test, _, reason = line.split(" ", 1)[1].partition(" - ")
            return test, (message or reason)[:300]
    return "", ""


_children: set = set()
_children_lock = threading.Lock()


def run_pytest(copy: Path, selection: catalog.Selection, timeout: float):
    """Run ``selection`` in ``copy``; returns (returncode or None on timeout, output, seconds, command)."""
    cache = copy / "numba-cache"
    cache.mkdir()
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "site")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["NUMBA_CACHE_DIR"] = str(cache)
    env["FASTOPT_MUTATION_COPY"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    command = [sys.executable, "-m", "pytest", "-x", "-q", "--tb=short", "-p", "no:cacheprovider",
               "-p", "mutation_guard", *selection.args()]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    with _children_lock:
        _children.add(process)
    try:
        output, _ = process.communicate(timeout=timeout)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n[mutation runner] killed after {timeout:.0f} s\n"
        returncode = None
    finally:
        with _children_lock:
            _children.discard(process)
    return returncode, output, time.monotonic() - start, command


def _guard_problem(copy: Path) -> str:
    """Why the guard's record shows the run did not test the copy ('' when it did)."""
    record = copy / "guard.txt"
    if not record.is_file():
        return "the mutation guard did not run"
    root = os.path.realpath(copy)
    for line in record.read_text().splitlines():
        name, _, path = line.partition(" ")
        if name == "PROBLEM":
            return path
        if not os.path.realpath(path).startswith(root + os.sep):
            return f"{name} is {path}, outside the copy"
    return ""


def evaluate(name: str, snapshot: Path, workdir: Path, selection: catalog.Selection,
             mutant: catalog.Mutant | None, timeout: float, keep: bool) -> Outcome:
    """Copy the snapshot, plant ``mutant`` (None: the baseline), run the selection, classify."""
    copy = Path(tempfile.mkdtemp(prefix=re.sub(r"[^\w.-]", "_", name) + "-", dir=workdir))
    shutil.rmtree(copy)
    shutil.copytree(snapshot, copy)
    try:
        if mutant is not None:
            path = copy / in_copy(mutant.file)
            source = path.read_text()
            if source.count(mutant.original) != 1:
                return Outcome(name, "error", 0.0, None, f"the snippet occurs {source.count(mutant.original)} "
                               f"times in {mutant.file}")
            path.write_text(source.replace(mutant.original, mutant.replacement))
        returncode, output, seconds, command = run_pytest(copy, selection, timeout)
        guard = _guard_problem(copy)
        record = copy / "guard.txt"
        if record.is_file():
            output = "mutation guard:\n" + record.read_text() + "\n" + output
        if guard:
            verdict, detail = "error", guard
        elif returncode is None:
            verdict, detail = "error", f"timed out after {timeout:.0f} s"
        elif returncode == 0:
            verdict, detail = ("passed" if mutant is None else "survived"), ""
        elif returncode == 1:
            broken = _broken(output)
            test, reason = _first_failure(output)
            if mutant is None:
                verdict, detail = "error", "failed: " + test
            elif broken:
                verdict, detail = "error", f"a test failed with {broken.group(1)}: the mutant does not compile or run"
            else:
                verdict, detail = "killed", test
        else:
            verdict, detail = "error", f"pytest exit status {returncode}"
        return Outcome(name, verdict, seconds, returncode, detail, reason if returncode == 1 else "", output,
                       command)
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reporting


def write_log(log_dir: Path, outcome: Outcome, mutant: catalog.Mutant | None, selection: catalog.Selection):
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / (re.sub(r"[^\w.-]", "_", outcome.name) + ".log")
    head = [f"{outcome.name}: {outcome.verdict} ({outcome.detail})" if outcome.detail else
            f"{outcome.name}: {outcome.verdict}",
            f"reason: {outcome.reason}",
            f"returncode: {outcome.returncode}, {outcome.seconds:.1f} s",
            f"selection: {selection}",
            f"command: {' '.join(outcome.command)}"]
    if mutant is not None:
        head += [f"file: {mutant.file}", f"category: {mutant.category}", f"description: {mutant.description}",
                 "--- original", mutant.original, "+++ replacement", mutant.replacement]
    path.write_text("\n".join(head) + "\n\n" + outcome.log)
    return path


def table(rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown(outcomes: dict, mutants: list, wall: float, jobs: int) -> str:
    killed = sum(outcomes[m.id].verdict == "killed" for m in mutants)
    lines = [f"{len(mutants)} mutants, {killed} killed (kill rate {100.0 * killed / max(len(mutants), 1):.1f} %); "
             f"wall time {wall / 60:.1f} min with -j {jobs}.", "",
             "| id | backend | category | what it changes | selection | verdict | s |",
             "|---|---|---|---|---|---|---|"]
    for m in mutants:
        o = outcomes[m.id]
        verdict = o.verdict + (f" by `{o.detail.split('::', 1)[-1]}`" if o.verdict == "killed" and o.detail else
                               f" ({o.detail})" if o.detail else "")
        lines.append(f"| `{m.id}` | {m.backend} | {m.category} | {m.description} | `{m.selection}` | "
                     f"{verdict} | {o.seconds:.0f} |")
    lines += ["", "Selections (pytest arguments, run from the copy's root):", "",
              "| selection | tests |", "|---|---|"]
    for name in dict.fromkeys(m.selection for m in mutants):
        lines.append(f"| `{name}` | `{catalog.SELECTIONS[name]}` |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="print the catalog and exit")
    parser.add_argument("--check", action="store_true",
                        help="only check that every snippet occurs exactly once (no test runs)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds one pytest run may take (default {DEFAULT_TIMEOUT:.0f})")
    parser.add_argument("--log-dir", type=Path, default=DEFAULT_LOG_DIR,
                        help=f"where logs and results.json go (default {DEFAULT_LOG_DIR.relative_to(ROOT)})")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the results as a Markdown table")
    parser.add_argument("--log-all", action="store_true", help="write a log for killed mutants too")
    parser.add_argument("--keep", action="store_true", help="keep the copies (under a folder in the temp dir)")
    args = parser.parse_args(argv)

    mutants = catalog.MUTANTS
    if args.only:
        known = {m.id: m for m in mutants}
        unknown = [i for i in args.only if i not in known]
        if unknown:
            parser.error(f"unknown mutant id(s): {', '.join(unknown)} (see --list)")
        mutants = [known[i] for i in dict.fromkeys(args.only)]

    if args.list:
        print(table([(m.id, m.category, m.file, m.selection, m.description) for m in mutants],
                    ("id", "category", "file", "selection", "description")))
        print(f"\n{len(mutants)} mutants")
        return 0

    problems = check_catalog()
    if args.check or problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{len(catalog.MUTANTS)} mutants: " + ("catalog OK" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0

    start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fastopt-mutation-"))
    snapshot = make_snapshot(workdir)
    log_dir = args.log_dir
    if log_dir.exists():
        for old in log_dir.glob("*.log"):
            old.unlink()
    failed = False
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            # 1. every selection passes without a mutant
            names = list(dict.fromkeys(m.selection for m in mutants))
            print(f"baseline: {len(names)} selections on the unmutated copy ({workdir})", flush=True)
            futures = {pool.submit(evaluate, f"baseline:{n}", snapshot, workdir, catalog.SELECTIONS[n], None,
                                   args.timeout, args.keep): n for n in names}
            for future in concurrent.futures.as_completed(futures):
                name = futures[future]
                o = future.result()
                print(f"  {name:28} {o.verdict:8} {o.seconds:6.1f} s  {o.detail}", flush=True)
                if o.verdict != "passed":
                    failed = True
                    print(f"    log: {write_log(log_dir, o, None, catalog.SELECTIONS[name])}", flush=True)
            if failed:
                print("a selection fails without any mutant: fix that first; no mutant was run", file=sys.stderr)
                return 2

            # 2. the mutants
            print(f"mutants: {len(mutants)}, -j {args.jobs}", flush=True)
            futures = {pool.submit(evaluate, m.id, snapshot, workdir, catalog.SELECTIONS[m.selection], m,
                                   args.timeout, args.keep): m for m in mutants}
            outcomes = {}
            for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                m = futures[future]
                o = outcomes[m.id] = future.result()
                print(f"  [{done}/{len(mutants)}] {m.id:40} {o.verdict:8} {o.seconds:6.1f} s  {o.detail}", flush=True)
                if o.verdict != "killed":
                    print(f"    log: {write_log(log_dir, o, m, catalog.SELECTIONS[m.selection])}", flush=True)
                elif args.log_all:
                    write_log(log_dir, o, m, catalog.SELECTIONS[m.selection])
    except KeyboardInterrupt:
        with _children_lock:
            for process in _children:
                os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    wall = time.monotonic() - start
    rows = [(m.id, m.backend, m.category, outcomes[m.id].verdict, f"{outcomes[m.id].seconds:.0f}",
             outcomes[m.id].detail.split("::", 1)[-1][:70]) for m in mutants]
    print()
    print(table(rows, ("id", "backend", "category", "verdict", "s", "killed by / detail")))
    counts = {v: sum(o.verdict == v for o in outcomes.values()) for v in ("killed", "survived", "error")}
    rate = 100.0 * counts["killed"] / len(mutants)
    print(f"\n{len(mutants)} mutants: {counts['killed']} killed, {counts['survived']} survived, "
          f"{counts['error']} errors; kill rate {rate:.1f} %; wall time {wall:.0f} s (-j {args.jobs})")
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "results.json").write_text(json.dumps(
        {"wall_seconds": wall, "jobs": args.jobs,
         "mutants": [dict(id=m.id, verdict=outcomes[m.id].verdict, seconds=round(outcomes[m.id].seconds, 1),
                          detail=outcomes[m.id].detail, reason=outcomes[m.id].reason) for m in mutants]},
        indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(outcomes, mutants, wall, args.jobs))
    return 0 if counts["killed"] == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
