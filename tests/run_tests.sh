#!/usr/bin/env bash
# The test commands of the README and of CI (.ci/run):
#   bash tests/run_tests.sh PYTHON [PYTEST_ARGS...]           `make test`: the full suite
#   NDE_ZOO_TEST_TIER=check bash tests/run_tests.sh PYTHON    `make check`: the fast tier (no e2e, slow, DDP)
# Everything but the tests marked `manual`, in one pytest session on two workers. A test file stays on one
# worker (its module fixtures run once); each benchmark's quick run is a group of its own, and the longest
# groups are taken first (tests/conftest.py), so the two workers finish together. The tests marked
# `standalone` (several processes each: torchrun, srun, a rank killed mid-fit) run in the session too,
# while the other worker goes on: much of their time is spent starting processes and waiting on them.
# Bytecode is cached (.pyc, and pytest's rewritten test modules) whatever PYTHONDONTWRITEBYTECODE says:
# each worker and each process a test starts would otherwise compile the package and the tests again.
# The slowest tests are listed at the end of each session (--durations in pyproject.toml), and a test
# not marked `slow` fails over the time limit (tests/conftest.py).
set -uo pipefail
unset PYTHONDONTWRITEBYTECODE
PY=${1:-python}
shift || true
status=0
WORKERS=${NDE_ZOO_TEST_WORKERS:-2}   # 0: one process
PARALLEL=()
if [ "$WORKERS" != "0" ]; then PARALLEL=(-n "$WORKERS" --dist loadgroup); fi
# The per-test time limit (tests/conftest.py): 60 s in the fast tier, where a slow test does not belong;
# 180 s in the full suite, which CI runs on machines of varying speed: there it catches a test grown
# minutes slower without failing on a slower runner. NDE_ZOO_TEST_TIME_LIMIT overrides both (0: off).
if [ "${NDE_ZOO_TEST_TIER:-full}" = "check" ]; then
  export NDE_ZOO_TEST_TIME_LIMIT=${NDE_ZOO_TEST_TIME_LIMIT:-60}
  exec "$PY" -m pytest -m "not slow and not manual and not standalone and not e2e and not ddp" "${PARALLEL[@]}" "$@"
fi
export NDE_ZOO_TEST_TIME_LIMIT=${NDE_ZOO_TEST_TIME_LIMIT:-180}
"$PY" -m pytest -m "not manual" "${PARALLEL[@]}" "$@" || status=$?
if [ $status -eq 5 ]; then status=0; fi  # no tests collected is not a failure of the suite
exit $status
