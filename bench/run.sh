#!/usr/bin/env bash
# Build (default preset) and run every iomm benchmark -- each executable made
# from a bench/*_bench.cpp, found by name, so a new file joins the run by
# itself -- in one run; judge the targets of bench/targets.json against
# baselines measured in that same run; write bench/RESULTS.md from it.
#
#   bench/run.sh                 # everything, 9 repetitions; writes bench/RESULTS.md
#   bench/run.sh --report        # the same, but exit 0 even if a target is missed
#   bench/run.sh --quick         # 1 repetition, a smoke test; results go to $OUT only
#   bench/run.sh --results FILE  # write the results there instead
#   OUT=/tmp/x bench/run.sh      # where the JSON goes (default build/default/bench/results)
#
# Exit status: 0 when every target is met; 1 when a target is missed, a
# benchmark reports an error (every benchmark turns a failed call into
# SkipWithError, never a fast result), a benchmark program exits non-zero
# (pin_bench does when pins or charges are left behind), or a row that
# targets.json names did not run. --report exits 0 for a missed target, but
# still 1 for an error or a missing row. Repetitions are randomly interleaved
# (--benchmark_enable_random_interleaving) so drift on a shared machine hits
# iomm and its baseline alike. The hugetlb pin benchmarks need root (they
# raise /proc/sys/vm/nr_hugepages for 512 free 2 MiB pages and put it back)
# and are errors otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Nine: on this shared machine a burst from another tenant lasts seconds and
# can take two or three consecutive repetitions of one row; with five, that
# moved a median by 20% (bench/NOTES.md, "Session s8").
REPS=9
REPORT_ONLY=0
RESULTS="$ROOT/bench/RESULTS.md"
while (($#)); do
  case "$1" in
    --quick) REPS=1 RESULTS="" ;;
    --report) REPORT_ONLY=1 ;;
    --results) RESULTS="$(realpath -m "$2")"; shift ;;
    *) echo "usage: bench/run.sh [--quick] [--report] [--results FILE]" >&2; exit 2 ;;
  esac
  shift
done

BENCHES=()
for f in bench/*_bench.cpp; do BENCHES+=("$(basename "$f" .cpp)"); done

cmake --preset default >/dev/null
cmake --build build/default -j2 --target "${BENCHES[@]}"

BIN="$ROOT/build/default/bench"
OUT="${OUT:-$BIN/results}"
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/exit_status

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u '+%Y-%m-%d %H:%M UTC')
for b in "${BENCHES[@]}"; do
  echo "=== $b ==="
  status=0
  "$BIN/$b" --benchmark_repetitions="$REPS" --benchmark_report_aggregates_only=true \
    --benchmark_enable_random_interleaving=true \
    --benchmark_out="$OUT/$b.json" --benchmark_out_format=json || status=$?
  echo "$b $status" >>"$OUT/exit_status"
done
END=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

CXX=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' build/default/CMakeCache.txt)
export RUN_START="$START" RUN_END="$END" LOAD_BEFORE LOAD_AFTER REPS
export MACHINE_CPU="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
export MACHINE_NPROC="$(nproc)" MACHINE_KERNEL="$(uname -r)"
export MACHINE_MEM="$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
export MACHINE_HOST="$(hostname)" RUN_USER="$(id -un)"
export BUILD_TYPE="$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' build/default/CMakeCache.txt)"
export COMPILER="$("$CXX" --version | head -1)"
export BENCHMARK_VERSION="$(dpkg-query -W -f='${Version}' libbenchmark-dev 2>/dev/null || echo unknown)"
export GIT_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"

python3 "$ROOT/bench/report.py" "$OUT" "$ROOT/bench/targets.json" "$RESULTS" "$REPORT_ONLY"
