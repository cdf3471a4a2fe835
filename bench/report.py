#!/usr/bin/env python3
"""Judge one bench/run.sh run: read every benchmark's JSON, check the
targets of bench/targets.json against baselines from the same run, print the
results and, when given a path, write them as RESULTS.md.

usage: report.py OUT_DIR TARGETS_JSON RESULTS_MD|'' REPORT_ONLY(0|1)
Exit: 0 all met (or only missed with REPORT_ONLY=1); 1 a miss, an error, a
failed benchmark program or a missing row.
"""
import json
import os
import sys

SCALE = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


def fmt(ns):
    for unit, k in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= k:
            return f"{ns / k:.3g} {unit}"
    return f"{ns:.3g} ns"


def load(out):
    """Medians by run name: {name: {"real": ns, "cpu": ns, counters...}}, errors."""
    rows, errors = {}, {}
    for f in sorted(os.listdir(out)):
        if not f.endswith(".json"):
            continue
        with open(os.path.join(out, f)) as fh:
            data = json.load(fh)
        for b in data["benchmarks"]:
            name = b.get("run_name", b["name"])
            if b.get("error_occurred"):
                errors[name] = b.get("error_message", "error")
                continue
            if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
                continue
            k = SCALE[b.get("time_unit", "ns")]
            row = {"real": b["real_time"] * k, "cpu": b["cpu_time"] * k, "bench": f[:-5]}
            for key, value in b.items():
                if isinstance(value, (int, float)) and key not in row:
                    row[key] = value
            rows[name] = row
    return rows, errors


def judge(t, rows):
    """One target -> dict with the figures and status (met, MISSED, MISSING, report)."""
    clock = t.get("time", "cpu")
    other = "real" if clock == "cpu" else "cpu"
    r = {"label": t["label"], "row": "-", "baseline": "-", "ratio": "-", "other": "-",
         "target": "report", "status": "reported"}
    a = rows.get(t["row"])
    b = rows.get(t["baseline"]) if "baseline" in t else None
    if a is None or ("baseline" in t and b is None):
        r["status"] = "MISSING"
        return r
    if "counter" in t:
        value = a.get(t["counter"], float("nan"))
        r["row"] = f"{value:.1f} {t['counter']}"
        if "max" in t:
            r["target"] = f"≤ {t['max']} {t['counter']}"
            r["status"] = "met" if value <= t["max"] else "MISSED"  # NaN (no counter) misses
        return r
    r["row"] = fmt(a[clock])
    if "max_ns" in t:
        r["target"] = f"≤ {fmt(t['max_ns'])} ({clock})"
        r["status"] = "met" if a[clock] <= t["max_ns"] else "MISSED"
        return r
    if "min_items_per_second" in t:
        ips = a.get("items_per_second", 0.0)
        r["row"] = f"{ips / 1e6:.1f} M/s"
        r["target"] = f"≥ {t['min_items_per_second'] / 1e6:.0f} M/s"
        r["status"] = "met" if ips >= t["min_items_per_second"] else "MISSED"
        return r
    if b is None:  # a figure to report, with no baseline
        return r
    r["baseline"] = fmt(b[clock])
    how = t.get("ratio", "baseline/row")
    ratio = b[clock] / a[clock] if how == "baseline/row" else a[clock] / b[clock]
    ratio_other = b[other] / a[other] if how == "baseline/row" else a[other] / b[other]
    r["ratio"] = f"{ratio:.2f}x ({how})"
    r["other"] = f"{ratio_other:.2f}x"
    if t.get("report"):
        return r
    bound = t["bound"]
    if how == "baseline/row":
        r["target"] = f"≥ {bound}x"
        r["status"] = "met" if ratio >= bound else "MISSED"
    else:
        r["target"] = f"≤ {bound}x"
        r["status"] = "met" if ratio <= bound else "MISSED"
    return r


def breakdown(t, rows):
    """One line: the row's time, the parts of it measured by other rows of the
    same run, and what the parts leave over; the baseline alongside."""
    clock = t.get("time", "cpu")
    a = rows.get(t["row"])
    if a is None:
        return f"{t['label']}: row missing"
    parts, total = [], 0.0
    for p in t["explained_by"]:
        r = rows.get(p["row"])
        if r is None:
            parts.append(f"{p['label']} (row `{p['row']}` missing)")
            continue
        total += r[clock]
        parts.append(f"{p['label']} {fmt(r[clock])}")
    line = f"{t['label']}: {fmt(a[clock])} ({clock}) = " + " + ".join(parts)
    rest = a[clock] - total
    line += f" {'+' if rest >= 0 else '-'} {fmt(abs(rest))} not accounted for"
    b = rows.get(t.get("baseline", ""))
    if b is not None:
        line += f"; baseline {fmt(b[clock])}"
    return line


def main():
    out, targets_path, results_path, report_only = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    rows, errors = load(out)
    with open(targets_path) as fh:
        targets = json.load(fh)["targets"]
    statuses = {}
    exit_path = os.path.join(out, "exit_status")
    if os.path.exists(exit_path):
        with open(exit_path) as fh:
            for line in fh:
                name, code = line.split()
                statuses[name] = int(code)
    failed_programs = {n: c for n, c in statuses.items() if c != 0}
    judged = [judge(t, rows) for t in targets]
    # A row named by a target that reported an error is an error, not missing.
    for j, t in zip(judged, targets):
        if j["status"] == "MISSING" and (t["row"] in errors or t.get("baseline") in errors):
            j["status"] = "ERROR"

    # A missed target whose row has a breakdown in the same run stays missed;
    # the breakdown only says where the time goes.
    for j, t in zip(judged, targets):
        if j["status"] == "MISSED" and t.get("explained_by"):
            j["status"] = "MISSED (explained)"
    missed = [j for j in judged if j["status"].startswith("MISSED")]
    missing = [j for j in judged if j["status"] == "MISSING"]
    missing_parts = [p["row"] for t in targets for p in t.get("explained_by", []) if p["row"] not in rows]
    bad = bool(errors or failed_programs or missing or missing_parts or any(j["status"] == "ERROR" for j in judged))

    env = os.environ
    lines = []
    w = lines.append
    w("# iomm benchmark results")
    w("")
    w("Written by `bench/run.sh` from one run; do not edit by hand (notes on the")
    w("targets: `bench/NOTES.md`).")
    w("")
    w(f"- Run: {env.get('RUN_START', '?')} to {env.get('RUN_END', '?')}, commit {env.get('GIT_COMMIT', '?')}, as {env.get('RUN_USER', '?')}")
    w(f"- Machine: `{env.get('MACHINE_HOST', '?')}`, {env.get('MACHINE_NPROC', '?')} CPUs "
      f"\"{env.get('MACHINE_CPU', '?')}\", {env.get('MACHINE_MEM', '?')} RAM, kernel {env.get('MACHINE_KERNEL', '?')}")
    w(f"- Load average (1/5/15 min): {env.get('LOAD_BEFORE', '?')} before, {env.get('LOAD_AFTER', '?')} after")
    w(f"- Build: `cmake --preset default` ({env.get('BUILD_TYPE', '?')}), {env.get('COMPILER', '?')}, "
      f"Google Benchmark {env.get('BENCHMARK_VERSION', '?')}")
    w(f"- Each figure is the median of {env.get('REPS', '?')} randomly interleaved repetitions. Ratios are judged")
    w("  on CPU time (the thread's CPU clock: the kernel work of our own syscalls counts,")
    w("  time other tenants held the core does not) unless the target says wall; the")
    w("  other clock's ratio is shown alongside.")
    w("")
    verdict = "all targets met"
    if missed:
        verdict = f"{len(missed)} of {len(judged)} targets MISSED"
    if bad:
        verdict += "; errors or missing rows (see below)"
    w(f"**Verdict: {verdict}.**")
    w("")
    w("## Targets")
    w("")
    w("| target | iomm | baseline | ratio | other clock | bound | status |")
    w("|---|---|---|---|---|---|---|")
    for j in judged:
        st = j["status"] if j["status"] in ("met", "reported") else f"**{j['status']}**"
        w(f"| {j['label']} | {j['row']} | {j['baseline']} | {j['ratio']} | {j['other']} | {j['target']} | {st} |")
    w("")
    explained = [(j, t) for j, t in zip(judged, targets) if t.get("explained_by")]
    if explained:
        w("## Breakdowns")
        w("")
        w("Where a target's row spends its time, from rows of the same run (NOTES.md says")
        w("what each part measures and why it cannot be removed).")
        w("")
        for j, t in explained:
            w(f"- {breakdown(t, rows)}")
        w("")
    if errors or failed_programs:
        w("## Errors")
        w("")
        for name in sorted(errors):
            w(f"- `{name}`: {errors[name]}")
        for name in sorted(failed_programs):
            w(f"- program `{name}` exited with status {failed_programs[name]}")
        w("")
    w("## Every row (medians: wall time / CPU time per iteration)")
    w("")
    w("| benchmark | row | wall | CPU | counters |")
    w("|---|---|---|---|---|")
    skip = {"real", "cpu", "bench", "family_index", "per_family_instance_index", "repetitions",
            "repetition_index", "threads", "iterations", "real_time", "cpu_time"}
    for name in sorted(rows, key=lambda n: (rows[n]["bench"], n)):
        r = rows[name]
        counters = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.items()) if k not in skip)
        w(f"| {r['bench']} | `{name}` | {fmt(r['real'])} | {fmt(r['cpu'])} | {counters} |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if results_path:
        with open(results_path, "w") as fh:
            fh.write(text)
        print(f"written to {results_path}")
    if bad:
        return 1
    if missed and not report_only:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
