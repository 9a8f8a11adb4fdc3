"""Mutation testing of the core modules with a scripted mutant set (benchmarks/_mutants.py).

    python benchmarks/bench_mutation.py                 # all mutants -> benchmarks/results/mutation.json
    python benchmarks/bench_mutation.py --only layer.py --ids issue-fold-x1.5   # a subset (not written by default)
    python benchmarks/bench_mutation.py --only init.py model.py --merge   # a subset, merged into mutation.json

Each mutant replaces one snippet of src/nora/FILE in a PRIVATE snapshot of the repository (`git archive HEAD` of src,
tests, docs, pyproject.toml into a temporary directory; the working tree is never touched), then runs the core test
subset from the snapshot with PYTHONPATH pointing at its src. A pytest plugin checks at session start that `nora`
was imported from the snapshot. The unmutated snapshot runs first: tests that already fail there are deselected (and
listed in the results). A mutant is killed when a test fails (or collection breaks), survives when the subset
passes. Score per file = killed / (mutants - stale - surviving equivalent ones).

Why not mutmut / cosmic-ray: both generate every operator mutation of every line (hundreds per core file) and run
the suite per mutant; at ~10-40 s per pytest start on this shared 2-core machine that is hours. The scripted set
targets one documented behaviour per mutant instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_facts, write_json
from _mutants import MUTANTS, SCOPE, Mutant

REPO = Path(__file__).resolve().parents[1]
#: the core test subset, fast and strong files first (each mutant stops at its first failing test: -x)
CORE_TESTS = (
    "tests/test_oracle.py",
    "tests/test_layer.py",
    "tests/test_init.py",
    "tests/test_config.py",
    "tests/test_properties.py",
    "tests/test_export.py",
    "tests/test_calibration.py",
    "tests/test_errors.py",
    "tests/test_params.py",
    "tests/test_outer_scaling.py",  # outer_scaling='orthonormal' (B^T B = I), < 0.1 s of tests
    "tests/test_bias.py",  # bias='all' / 'nora_only' through save, merge and export_lora, < 1 s of tests
)
#: slow tests left out of the default subset (mutants that need them name them in `tests`)
SLOW = (
    "tests/test_layer.py::test_layer_compiles_without_graph_breaks",
    "tests/test_calibration.py::test_distributed_calibration_agrees_across_ranks",
)
GUARD = """
import os, pytest

def pytest_sessionstart(session):
    import nora
    root = os.environ["NORA_MUTATION_SRC"]
    if not os.path.abspath(nora.__file__).startswith(root):
        pytest.exit(f"nora imported from {nora.__file__}, not from the mutated copy {root}", returncode=3)
"""


def snapshot(dest: Path) -> str:
    """`git archive HEAD` of what the tests need into dest; returns the commit."""
    commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    paths = ["src", "tests", "docs", "pyproject.toml", "README.md", "benchmarks"]
    archive = subprocess.run(["git", "archive", commit, *paths], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "_guard").mkdir()
    (dest / "_guard" / "nora_mutation_guard.py").write_text(GUARD)
    return commit


def run_tests(root: Path, tests: tuple[str, ...], deselect: list[str], timeout: float, stop_first: bool = True):
    """(pytest return code, failing test ids, seconds) for `tests` run from the snapshot."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        PYTHONPATH=f"{root / 'src'}{os.pathsep}{root / '_guard'}",
        NORA_MUTATION_SRC=str(root / "src"),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-rfE", "-p", "no:cacheprovider", "-p", "nora_mutation_guard"]
    cmd += ["-W", "ignore"] + (["-x"] if stop_first else [])
    for test in deselect:
        cmd += ["--deselect", test]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", [], time.perf_counter() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    if proc.returncode == 3 or (proc.returncode not in (0, 1, 2) and not failed):
        raise RuntimeError(f"pytest could not run the mutant (rc {proc.returncode}):\n{proc.stdout[-3000:]}")
    return proc.returncode, [f.split(" - ")[0] for f in failed], time.perf_counter() - start


def run_mutant(root: Path, mutant: Mutant, deselect: dict[tuple, list[str]], timeout: float) -> dict:
    path = root / "src" / "nora" / mutant.file
    original = path.read_text()
    record = {"id": mutant.id, "file": mutant.file, "what": mutant.what, "tests": list(mutant.tests) or "core"}
    if mutant.equivalent:
        record["equivalent"] = mutant.equivalent
    if original.count(mutant.old) != 1:
        record.update(status="stale", note=f"snippet found {original.count(mutant.old)} times in the source")
        return record
    tests = mutant.tests or CORE_TESTS
    path.write_text(original.replace(mutant.old, mutant.new))
    try:
        named = mutant.id.startswith("issue-")  # the mutants: list every test that fails, not the first
        rc, failed, seconds = run_tests(root, tests, deselect[tests], timeout, stop_first=not named)
    finally:
        path.write_text(original)
    status = "killed" if rc in (1, 2, "timeout") else "survived"
    record.update(status=status, killed_by=failed[: 40 if named else 3], seconds=round(seconds, 1))
    if rc == "timeout":
        record["note"] = f"timed out after {timeout:.0f} s (counted as killed)"
    elif rc == 2:
        record["note"] = "collection/usage error (the mutant breaks import)"
    return record


def scores(records: list[dict]) -> dict[str, dict]:
    out = {}
    for file in sorted({r["file"] for r in records}):
        rows = [r for r in records if r["file"] == file]
        killed = sum(r["status"] == "killed" for r in rows)
        stale = sum(r["status"] == "stale" for r in rows)
        equivalent = sum(r["status"] == "survived" and bool(r.get("equivalent")) for r in rows)
        counted = len(rows) - stale - equivalent
        out[file] = {
            "mutants": len(rows),
            "killed": killed,
            "survived": sum(r["status"] == "survived" for r in rows),
            "stale": stale,
            "equivalent_survivors": equivalent,
            "score": round(killed / counted, 3) if counted else None,
            "in_scope": file in SCOPE,
        }
    return out


def merge(old: dict, new: dict) -> dict:
    """`new` (a partial run) over `old`: the chosen mutants' rows replaced, the other rows kept in MUTANTS order, the
    scores recomputed; `commits` lists every commit a kept row was measured at (rows carry their own `commit`)."""
    rows = {r["id"]: {"commit": old.get("commit"), **r} for r in old.get("mutants", [])}
    rows.update({r["id"]: r for r in new["mutants"]})
    records = [rows[m.id] for m in MUTANTS if m.id in rows]
    in_use = {" ".join(m.tests or CORE_TESTS) for m in MUTANTS}  # a baseline of an older core subset is dropped
    baseline = {k: v for k, v in {**old.get("baseline", {}), **new["baseline"]}.items() if k in in_use}
    commits = sorted({r["commit"] for r in records if r.get("commit")})
    runs = [*old.get("runs", [old.get("command")]), new["command"]]
    return {**new, "commits": commits, "runs": [c for c in runs if c], "baseline": baseline,
            "scores": scores(records), "mutants": records}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="files (relative to src/nora) to mutate")
    parser.add_argument("--ids", nargs="*", default=None, help="mutant ids to run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant run")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/mutation.json for a "
                        "full run, nothing for a subset)")  # fmt: skip
    parser.add_argument("--merge", action="store_true", help="update the --out record (default mutation.json): "
                        "replace the chosen mutants' rows, keep the others, recompute the scores")  # fmt: skip
    args = parser.parse_args(argv)
    chosen = [
        m for m in MUTANTS if (args.only is None or m.file in args.only) and (args.ids is None or m.id in args.ids)
    ]
    if not chosen:
        parser.error("no mutant matches --only / --ids")
    unknown = set(args.ids or ()) - {m.id for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant ids: {sorted(unknown)}")
    full = args.only is None and args.ids is None
    out = Path(args.out) if args.out else (RESULTS_DIR / "mutation.json" if full or args.merge else None)

    with tempfile.TemporaryDirectory(prefix="nora-mutation-") as tmp:
        root = Path(tmp)
        commit = snapshot(root)
        subsets = sorted({m.tests or CORE_TESTS for m in chosen})
        deselect, baseline = {}, {}
        for tests in subsets:  # the unmutated snapshot: tests failing there say nothing about mutants
            rc, failed, seconds = run_tests(root, tests, list(SLOW) if tests == CORE_TESTS else [], args.timeout,
                                            stop_first=False)  # fmt: skip
            deselect[tests] = (list(SLOW) if tests == CORE_TESTS else []) + failed
            baseline[" ".join(tests)] = {"rc": rc, "failing_at_head": failed, "seconds": round(seconds, 1)}
            print(
                f"baseline ({len(tests)} files): rc {rc}, {len(failed)} failing at HEAD, {seconds:.0f} s", flush=True
            )
        records = []
        for i, mutant in enumerate(chosen, 1):
            record = {**run_mutant(root, mutant, deselect, args.timeout), "commit": commit}
            records.append(record)
            print(
                f"[{i}/{len(chosen)}] {record['status']:8s} {mutant.id:32s} {record.get('killed_by', '')}", flush=True
            )
        shutil.rmtree(root / "_guard", ignore_errors=True)

    result = {
        "benchmark": "mutation",
        "command": "python benchmarks/bench_mutation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit,
        "core_tests": list(CORE_TESTS),
        "deselected_slow": list(SLOW),
        "baseline": baseline,
        "scores": scores(records),
        "mutants": records,
        "machine": machine_facts(),
    }
    if args.merge and out is not None and out.is_file():
        result = merge(json.loads(out.read_text()), result)
    for file, s in result["scores"].items():
        print(f"{file:20s} {s['killed']}/{s['mutants']} killed, score {s['score']}", flush=True)
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
