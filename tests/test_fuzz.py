"""A few hundred fuzz cases in CI (tests/fuzzing.py has the generators and the long run): mutated
cfgs, weights files and data files must each build and run or fail with an EngineError; no crash,
no case over its time limit, no MemoryError under the address-space limit."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("kind, count", [("cfg", 300), ("weights", 150), ("data", 90)])
def test_fuzz_cases_end_in_engine_errors(kind, count):
    result = subprocess.run([sys.executable, os.path.join(HERE, "fuzzing.py"), "--worker", kind,
                             "0", str(count)], capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == count, result.stderr[-2000:]
    bad = [r for r in records if r["status"] not in ("ok", "error")]
    assert not bad, "\n".join(f"case {r['number']}: {r['status']}: {r['detail']}" for r in bad[:5])
    # The mutations must reach past the parser: some cases run to the end.
    assert sum(r["status"] == "ok" for r in records) >= count // 20


@pytest.mark.slow
def test_long_fuzz_run():
    """The long run the closing note reports (python tests/fuzzing.py): 10,000 cfgs, 3,000
    weights files, 1,000 data sets."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "fuzzing.py")],
                            capture_output=True, text=True, timeout=7200)
    assert result.returncode == 0, result.stdout[-4000:]
