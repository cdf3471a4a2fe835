#!/usr/bin/env bash
# Run every guest scenario (tests/guest/*.sh other than lib.sh and run.sh)
# one after the other, within one deadline, and print the stage summary:
#   guest: N passed, N failed, N skipped (T s)
# Usage: tests/guest/run.sh [BUILD_DIR [SCENARIO ...]]
#   BUILD_DIR  holds the static guest binaries (default build/default)
#   SCENARIO   names of scenarios to run (default: all)
# Exit status: 0 if nothing failed and something passed.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
start=$SECONDS
export GUEST_BUILD=${1:-$here/../../build/default}
(($#)) && shift
export GUEST_WORK
GUEST_WORK=$(mktemp -d /tmp/iomm-guest.XXXXXX)
export GUEST_RESULTS=$GUEST_WORK/results
export GUEST_DEADLINE=$(($(date +%s) + ${GUEST_STAGE_SECONDS:-170}))
: >"$GUEST_RESULTS"
# shellcheck source=lib.sh
source "$here/lib.sh"
export GUEST_KVER

scenarios=("$@")
if ((${#scenarios[@]} == 0)); then
  for f in "$here"/*.sh; do
    case $(basename "$f") in lib.sh | run.sh) continue ;; esac
    scenarios+=("$(basename "$f" .sh)")
  done
fi

if ! guest_require; then
  for s in "${scenarios[@]}"; do guest_report fail "$s" "missing:$GUEST_MISSING"; done
else
  echo "guest kernel $GUEST_KVER, work directory $GUEST_WORK"
  for s in "${scenarios[@]}"; do
    echo "--- $s ($(guest_seconds_left) s left)"
    before=$(wc -l <"$GUEST_RESULTS")
    bash "$here/$s.sh"
    status=$?
    after=$(wc -l <"$GUEST_RESULTS")
    if ((after == before)); then
      guest_report fail "$s" "the scenario reported nothing (exit status $status)"
    elif ((status != 0)) && ! grep -q '^fail ' <(tail -n +$((before + 1)) "$GUEST_RESULTS"); then
      guest_report fail "$s" "the scenario exited with status $status"
    fi
  done
fi

passed=$(grep -c '^pass ' "$GUEST_RESULTS")
failed=$(grep -c '^fail ' "$GUEST_RESULTS")
skipped=$(grep -c '^skip ' "$GUEST_RESULTS")
if ((failed == 0)); then
  rm -rf "$GUEST_WORK"
else
  echo "logs kept in $GUEST_WORK"
fi
echo "guest: $passed passed, $failed failed, $skipped skipped ($((SECONDS - start)) s)"
((failed == 0 && passed > 0))
