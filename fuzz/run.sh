#!/usr/bin/env bash
# Build the libFuzzer targets (clang, ASan + UBSan) in build/fuzz, replay the
# saved crash reproducers, then fuzz each target for a bounded time.
#
# Usage: fuzz/run.sh [target...]        (default: every target with a corpus)
# Env:   FUZZ_SECONDS=60                 fuzzing time per target (0: only replay)
#        FUZZ_UPDATE_TRACES=1            rewrite the reproducers' expected traces
#        FUZZ_JOBS=$(nproc)              build parallelism
#        FUZZ_TSAN=1                     build with ThreadSanitizer instead of ASan+UBSan
#                                        (in build/fuzz-tsan), for the concurrent rounds
# Exits non-zero if a build fails, a target with a corpus in fuzz/corpus/ was
# not built, a reproducer in fuzz/regressions/ still crashes or departs from
# its expected trace, or a target crashed (reports, artifacts: build/fuzz/artifacts/).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${FUZZ_SECONDS:-60}
build=build/fuzz
sanitizers=address,undefined
if [[ ${FUZZ_TSAN:-0} == 1 ]]; then
  build=build/fuzz-tsan
  sanitizers=thread
  # A race report must stop the run, so libFuzzer records the input.
  export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1}
fi

# The project's packages, plus clang and its libFuzzer runtime.
scripts/install-deps || exit 1
missing=()
for p in clang libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
    exit 1
fi

cmake -S . -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DIOMM_BUILD_FUZZ=ON -DIOMM_BUILD_TESTS=OFF -DIOMM_BUILD_BENCH=OFF \
  -DIOMM_FUZZ_SANITIZERS="$sanitizers" >/dev/null || {
  echo "fuzz: configure failed"
  exit 1
}
cmake --build "$build" -j"${FUZZ_JOBS:-$(nproc)}" --target iomm_fuzzers || {
  echo "fuzz: build failed"
  exit 1
}

# Every target with a seed corpus runs by default; one that was not built
# fails the run below ("not built").
targets=("$@")
if ((${#targets[@]} == 0)); then
  for dir in fuzz/corpus/*/; do
    targets+=("$(basename "$dir")_fuzzer")
  done
fi

flags=(-timeout=10 -rss_limit_mb=4096 -max_len=1024)

# A replay's step lines, split into runs: libFuzzer may run a lone input
# twice (its leak check reruns an input whose mallocs and frees did not
# balance), and each run opens with "trace: input". A target that prints no
# trace has one empty run. Writes <dir>/1, <dir>/2, ...
split_runs() {
  awk -v dir="$1" '
    BEGIN { n = 1; printf "" > (dir "/1") }
    /^trace: input$/ { if (seen) { n++; printf "" > (dir "/" n) } seen = 1; next }
    /^step / { print > (dir "/" n) }'
}
failed=()
summary=()
for target in "${targets[@]}"; do
  bin=$build/fuzz/$target
  name=${target%_fuzzer}
  seeds=fuzz/corpus/$name
  scratch=$build/corpus/$name
  artifacts=$build/artifacts/$name
  logs=$build/logs
  mkdir -p "$scratch" "$artifacts" "$logs" "$seeds"
  if [[ ! -x $bin ]]; then
    echo "fuzz: no binary for $target"
    failed+=("$target (not built)")
    continue
  fi

  # 1. Every saved reproducer must run clean (each on its own: one crash
  #    does not hide the others) and take exactly the steps of its expected
  #    trace, <reproducer>.trace (the IOMM_FUZZ_TRACE=1 lines: each call and
  #    its result), so that it still reaches the call it guards.
  #    FUZZ_UPDATE_TRACES=1 rewrites the traces (after an intended change).
  regressions=0
  bad_repros=()
  for f in fuzz/regressions/"$name"/*; do
    [[ -f $f && $f != *.trace ]] || continue
    regressions=$((regressions + 1))
    log=$logs/$name.replay.$(basename "$f").log
    if ! IOMM_FUZZ_TRACE=1 "$bin" "${flags[@]}" "$f" >"$log" 2>&1; then
      bad_repros+=("$(basename "$f") (crash)")
      continue
    fi
    run_dir=$log.runs
    rm -rf "$run_dir" && mkdir -p "$run_dir" && split_runs "$run_dir" <"$log"
    if [[ ${FUZZ_UPDATE_TRACES:-0} == 1 ]]; then
      cp "$run_dir/1" "$f.trace"
    elif [[ ! -f $f.trace ]]; then
      bad_repros+=("$(basename "$f") (no $f.trace)")
    else
      # Every run must take exactly the expected steps.
      : >"$log.diff"
      for run in "$run_dir"/*; do
        diff -u --label expected --label "run $(basename "$run")" "$f.trace" "$run" >>"$log.diff"
      done
      [[ -s $log.diff ]] && bad_repros+=("$(basename "$f") (trace differs: $log.diff)")
    fi
  done
  if ((${#bad_repros[@]})); then
    echo "fuzz: $target: ${#bad_repros[@]} of $regressions reproducers fail: ${bad_repros[*]}"
    echo "      (logs: $logs/$name.replay.<file>.log)"
    failed+=("$target (regressions: ${bad_repros[*]})")
  fi

  # 2. Fuzz. New inputs go to the scratch corpus (first directory); the
  #    seed corpus is only read. FUZZ_SECONDS=0: replay only.
  if ((seconds == 0)); then
    summary+=("$(printf '%-22s fuzzing skipped (FUZZ_SECONDS=0)  regressions %s/%s clean' \
      "$target" "$((regressions - ${#bad_repros[@]}))" "$regressions")")
    continue
  fi
  log=$logs/$name.fuzz.log
  if [[ ${FUZZ_TSAN:-0} == 1 ]]; then
    # No coverage in this build (see fuzz/CMakeLists.txt), so libFuzzer
    # cannot explore: replay the seeds and the ASan build's corpus, pass
    # after pass (each pass interleaves the threads anew).
    echo "=== replaying $target's corpus under TSan for ${seconds}s ==="
    explored=build/fuzz/corpus/$name
    mkdir -p "$explored"
    : >"$log"
    rc=0
    end=$((SECONDS + seconds))
    while ((rc == 0 && SECONDS < end)); do
      timeout --signal=KILL 900 "$bin" "${flags[@]}" -runs=0 -artifact_prefix="$artifacts/" \
        "$seeds" "$explored" >>"$log" 2>&1
      rc=$?
    done
    runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | awk '{n += $1} END {print n}')
  else
    echo "=== fuzzing $target for ${seconds}s ==="
    timeout --signal=KILL $((seconds + 300)) \
      "$bin" "${flags[@]}" -max_total_time="$seconds" -print_final_stats=1 \
      -artifact_prefix="$artifacts/" "$scratch" "$seeds" >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  fi
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  corpus=$(find "$scratch" -type f | wc -l)
  crash=no
  if ((rc != 0)); then
    crash=yes
    artifact=$(grep -o "Test unit written to .*" "$log" | tail -1 | sed 's/Test unit written to //')
    echo "fuzz: $target crashed (exit $rc); log $log; reproducer ${artifact:-none}"
    grep -E 'INVARIANT VIOLATED|ERROR: (AddressSanitizer|UndefinedBehaviorSanitizer|LeakSanitizer|libFuzzer)|WARNING: ThreadSanitizer|runtime error' "$log" | head -5
    failed+=("$target (crash)")
  fi
  summary+=("$(printf '%-22s runs %-9s cov %-6s ft %-7s corpus %-6s regressions %s/%s clean  crash %s' \
    "$target" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$corpus" \
    "$((regressions - ${#bad_repros[@]}))" "$regressions" "$crash")")
done

echo "=== fuzz summary (${seconds}s per target) ==="
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "FUZZ FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: no crash"
