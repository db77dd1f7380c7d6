#!/usr/bin/env bash
# The test commands of the README and of CI (.ci/run):
#   bash tests/run_tests.sh PYTHON [PYTEST_ARGS...]           `make test`: the full suite
#   NDE_ZOO_TEST_TIER=check bash tests/run_tests.sh PYTHON    `make check`: the fast tier (no e2e, slow, DDP)
# 1. Everything but the standalone tests, in one pytest session on two workers. A test file stays on one
#    worker (its module fixtures run once); each benchmark's quick run is a group of its own
#    (tests/conftest.py), so they spread over the workers.
# 2. (full suite) Tests marked `standalone` (they launch the command line in several processes: torchrun,
#    srun, a rank killed mid-fit) one pytest process each, NDE_ZOO_STANDALONE_JOBS (2) at a time, each
#    one's output printed when it ends.
# The slowest tests are listed at the end of each session (--durations in pyproject.toml), and a test
# not marked `slow` fails over the time limit (tests/conftest.py).
set -uo pipefail
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
"$PY" -m pytest -m "not manual and not standalone" "${PARALLEL[@]}" "$@" || status=$?
if [ $status -eq 5 ]; then status=0; fi  # no tests collected is not a failure of the suite

mapfile -t STANDALONE < <("$PY" -m pytest -m "standalone and not manual" --collect-only -q "$@" 2>/dev/null | grep '::')
if [ ${#STANDALONE[@]} -gt 0 ]; then
  JOBS=${NDE_ZOO_STANDALONE_JOBS:-2}
  LOGS=$(mktemp -d)
  echo "standalone tests: ${#STANDALONE[@]}, $JOBS at a time"
  start=$SECONDS
  running=0
  for i in "${!STANDALONE[@]}"; do
    ( "$PY" -m pytest -q -p no:cacheprovider "${STANDALONE[$i]}" >"$LOGS/$i.log" 2>&1; echo $? >"$LOGS/$i.rc"
      echo "--- ${STANDALONE[$i]} (exit $(cat "$LOGS/$i.rc"))"; tail -n 25 "$LOGS/$i.log" ) &
    running=$((running + 1))
    if [ $running -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
  done
  wait
  for i in "${!STANDALONE[@]}"; do
    if [ "$(cat "$LOGS/$i.rc")" != "0" ]; then status=1; echo "FAILED standalone: ${STANDALONE[$i]}"; fi
  done
  echo "standalone tests done in $((SECONDS - start)) s"
  rm -rf "$LOGS"
fi
exit $status
