#!/usr/bin/env bash
# The test command of the README (`make test`) and of CI (.ci/run).
# 1. Everything except the process-launching DDP tests, in one pytest session (two workers).
# 2. Tests marked `standalone` (they re-launch the command line, e.g. trainer.strategy=ddp
#    through the CLI) one pytest process per test.
set -uo pipefail
PY=${1:-python}
shift || true
status=0
# Two workers by default (NDE_ZOO_TEST_WORKERS=0 runs in one process); whole files per worker, so a
# file's session fixtures (e.g. bench_quick) run once.
WORKERS=${NDE_ZOO_TEST_WORKERS:-2}
PARALLEL=()
if [ "$WORKERS" != "0" ]; then PARALLEL=(-n "$WORKERS" --dist loadfile); fi
"$PY" -m pytest -m "not slow and not standalone" "${PARALLEL[@]}" "$@" || status=$?
if [ $status -eq 5 ]; then status=0; fi  # no tests collected is not a failure of the suite
for test_id in $("$PY" -m pytest -m "standalone and not slow" --collect-only -q "$@" 2>/dev/null | grep '::'); do
  "$PY" -m pytest -q "$test_id" || status=1
done
exit $status
