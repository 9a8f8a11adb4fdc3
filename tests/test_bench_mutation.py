"""benchmarks/bench_mutation.py's own logic (no pytest run per mutant here): the mutant set is well formed, a
snippet that no longer exists is reported as stale (never skipped silently), scores count equivalent survivors out."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_mutation", BENCH / "bench_mutation.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_mutation"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_mutant_set_is_well_formed(bench):
    ids = [m.id for m in bench.MUTANTS]
    assert len(ids) == len(set(ids)) >= 60
    assert all(m.old != m.new and m.what for m in bench.MUTANTS)
    named = [m for m in bench.MUTANTS if m.id.startswith("issue-")]
    assert len(named) == 5  # the four rows of issue 20's table (the forward row has two mutants)
    for file in bench.SCOPE:  # every core file has mutants
        assert sum(m.file == file for m in bench.MUTANTS) >= 7, file


def test_stale_snippet_is_reported_not_run(bench, tmp_path):
    (tmp_path / "src" / "nora").mkdir(parents=True)
    (tmp_path / "src" / "nora" / "layer.py").write_text("x = 1\n")
    mutant = bench.Mutant("m", "layer.py", "y = 2", "y = 3", "a snippet that is gone")
    record = bench.run_mutant(tmp_path, mutant, {}, timeout=1)
    assert record["status"] == "stale" and "0 times" in record["note"]
    assert (tmp_path / "src" / "nora" / "layer.py").read_text() == "x = 1\n"


def test_scores_leave_out_stale_and_equivalent_survivors(bench):
    records = [
        {"file": "layer.py", "status": "killed"},
        {"file": "layer.py", "status": "killed"},
        {"file": "layer.py", "status": "survived"},
        {"file": "layer.py", "status": "survived", "equivalent": "why"},
        {"file": "layer.py", "status": "stale"},
    ]
    s = bench.scores(records)["layer.py"]
    assert (s["mutants"], s["killed"], s["survived"], s["stale"], s["equivalent_survivors"]) == (5, 2, 2, 1, 1)
    assert s["score"] == round(2 / 3, 3) and s["in_scope"]
