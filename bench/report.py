#!/usr/bin/env python3
"""Turns the raw results of bench/run.sh into latest.json and latest.md.

Usage: report.py WORK_DIR OUT_DIR  (WORK_DIR holds SERVER-NAME.json files
written by kubechat-bench; the environment carries the run's metadata).
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SERVERS = ("kubechat", "centrifugo")
NAMES = ("idle", "connect", "group", "pairs5k", "pairs20k")
VARIANTS = ("before", "after")


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_us_per_message(step):
    """The server's CPU per message it delivered in a step (to all its
    recipients), in µs; None when not measured. Delivered, not offered: a
    server that falls behind is not credited with what it did not do."""
    cores = (step.get("server_usage") or {}).get("cores")
    recipients = step.get("recipients_per_message") or 1
    rate = (step.get("deliveries_per_s") or 0) / recipients
    return cores / rate * 1e6 if cores and rate else None


def load(work):
    results = {s: {} for s in SERVERS}
    for server in SERVERS:
        for name in NAMES:
            path = work / f"{server}-{name}.json"
            if path.exists():
                results[server][name] = json.loads(path.read_text())
    return results


def stored_bytes(work, results):
    """Growth of the standalone gateway's data dir per acked group message."""
    group = results["kubechat"].get("group")
    try:
        empty = int((work / "kubechat-empty.stored-bytes").read_text())
        after = int((work / "kubechat-group.stored-bytes").read_text())
    except (OSError, ValueError):
        return None
    if not group:
        return None
    acked = sum(s["acked"] for s in group["steps"])
    if acked == 0:
        return None
    return {"data_dir_bytes_empty": empty, "data_dir_bytes_after": after, "group_messages_acked": acked,
            "bytes_per_message": round((after - empty) / acked),
            "members": group["params"]["members"], "message_text_bytes": group["message_bytes"]}


def ms(us):
    if us is None:
        return "–"
    if us < 10_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1000:.0f} ms" if us < 1_000_000 else f"{us / 1_000_000:.1f} s"


def num(x, digits=0):
    return "–" if x is None else f"{x:,.{digits}f}"


def ratio(a, b, better):
    if a is None or b is None or b == 0:
        return "–"
    r = a / b
    return f"{r:,.0f} ({better})" if r >= 10 else f"{r:.2f} ({better})"


def measured_steps(result):
    return [s for s in result.get("steps", []) if not s["warmup"]] if result else []


def problems(step):
    """What must never be hidden: closes (4008!), errors, missing deliveries."""
    notes = []
    if step.get("closes"):
        notes.append("**closed " + ", ".join(f"{code}×{n}" for code, n in step["closes"].items()) + "**")
    if step.get("errors"):
        notes.append("errors " + ", ".join(f"{code}×{n}" for code, n in step["errors"].items()))
    unacked = step.get("sent", 0) - step.get("acked", 0) - sum((step.get("errors") or {}).values())
    if unacked > 0:
        notes.append(f"{unacked:,} of {step['sent']:,} sends not acked by the end")
    if step.get("missing"):
        notes.append(f"{step['missing']:,} not delivered")
    return ("; " + "; ".join(notes)) if notes else ""


def rows(results, stored):
    kc, cf = results["kubechat"], results["centrifugo"]
    out = []

    def idle(r, key):
        return ((r.get("idle") or {}).get("server_usage") or {}).get(key)

    n = (kc.get("idle") or cf.get("idle") or {}).get("opened")
    if n is not None:
        a, b = idle(kc, "kib_per_connection"), idle(cf, "kib_per_connection")
        out.append((f"RSS per idle authenticated connection, {n:,} connections",
                    f"{num(a, 1)} KiB", f"{num(b, 1)} KiB", ratio(a, b, "lower is better")))
        a, b = idle(kc, "cpu_us_per_connection_per_s"), idle(cf, "cpu_us_per_connection_per_s")
        out.append(("idle CPU per connection (kubechat 5 s heartbeats, Centrifugo 25 s pings)",
                    f"{num(a, 2)} µs/s", f"{num(b, 2)} µs/s", ratio(a, b, "lower is better")))
    if kc.get("connect") or cf.get("connect"):
        n = (kc.get("connect") or cf.get("connect"))["params"]["connections"]
        a = (kc.get("connect") or {}).get("connections_per_s")
        b = (cf.get("connect") or {}).get("connections_per_s")
        out.append((f"connection setup, {n:,} clients", f"{num(a)} conn/s", f"{num(b)} conn/s",
                    ratio(a, b, "higher is better")))
    kc_steps, cf_steps = measured_steps(kc.get("group")), measured_steps(cf.get("group"))
    members = (kc.get("group") or cf.get("group") or {}).get("params", {}).get("members")
    for i in range(max(len(kc_steps), len(cf_steps))):
        a = kc_steps[i] if i < len(kc_steps) else None
        b = cf_steps[i] if i < len(cf_steps) else None
        rate = (a or b)["offered_rate"]

        def cell(s):
            if s is None:
                return "–"
            dpc = (s.get("server_usage") or {}).get("deliveries_per_cpu_second")
            return (f"{num(s['deliveries_per_s'])} deliveries/s, p99 {ms(s['latency'].get('p99_us'))}, "
                    f"p99.9 {ms(s['latency'].get('p999_us'))}, {num(dpc)} per CPU-s, "
                    f"{num(cpu_us_per_message(s), 1)} µs CPU per message{problems(s)}")

        p99 = [s["latency"].get("p99_us") if s else None for s in (a, b)]
        out.append((f"{members}-member group, {num(rate)} msg/s offered", cell(a), cell(b),
                    ratio(p99[0], p99[1], "p99, lower is better")))

    def best(steps):
        values = [(s.get("server_usage") or {}).get("deliveries_per_cpu_second") for s in steps]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    if kc_steps or cf_steps:
        a, b = best(kc_steps), best(cf_steps)
        out.append(("group deliveries per server CPU-second, best step", num(a), num(b),
                    ratio(a, b, "higher is better")))
    for name in ("pairs5k", "pairs20k"):
        a = measured_steps(kc.get(name))
        b = measured_steps(cf.get(name))
        if not a and not b:
            continue
        params = (kc.get(name) or cf.get(name))["params"]

        def cell(steps):
            if not steps:
                return "–"
            s = steps[0]
            cores = (s.get("server_usage") or {}).get("cores")
            return (f"p50 {ms(s['latency'].get('p50_us'))}, p99 {ms(s['latency'].get('p99_us'))}, "
                    f"p99.9 {ms(s['latency'].get('p999_us'))}, {num(cores, 2)} core, "
                    f"{num(cpu_us_per_message(s), 1)} µs CPU per message{problems(s)}")

        p99 = [s[0]["latency"].get("p99_us") if s else None for s in (a, b)]
        out.append((f"1:1, {params['pairs']:,} pairs, {num(params['rate'])} msg/s total", cell(a), cell(b),
                    ratio(p99[0], p99[1], "p99, lower is better")))
    if stored:
        out.append((f"stored bytes per group message ({stored['members']} members, "
                    f"{stored['message_text_bytes']}-byte text)", f"{num(stored['bytes_per_message'])} B",
                    "– (in memory)", ""))
    return out


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def metric_mean(text, name):
    """sum/count of a histogram over every gateway's /metrics in `text`."""
    total = {"sum": 0.0, "count": 0.0}
    for line in (text or "").splitlines():
        for part in total:
            if line.startswith(f"kubechat_gateway_{name}_{part} "):
                total[part] += float(line.split()[1])
    return total["sum"] / total["count"] if total["count"] else None


def load_cluster(work):
    """The two-gateway runs and the raw store runs, by name."""
    out = {"insert": read_json(work / "cql-insert.json"), "lwt": read_json(work / "cql-lwt.json")}
    for variant in VARIANTS:
        for run in ("max", "half"):
            result = read_json(work / f"cluster-{variant}-{run}.json")
            if result:
                try:
                    result["metrics_text"] = (work / f"cluster-{variant}-{run}.metrics").read_text()
                except OSError:
                    result["metrics_text"] = ""
            out[f"{variant}-{run}"] = result
    return out


def cluster_rows(cluster):
    """One row per build: what two gateways sustain against the raw store."""
    insert, lwt = cluster.get("insert"), cluster.get("lwt")
    if not insert:
        return [], []
    raw_rate = insert["closed_loop"]["rate"]
    half_raw = (insert.get("open_loop") or [None])[0]
    raw_p99_half = half_raw["latency"].get("p99_us") if half_raw else None
    lwt_rate = lwt["closed_loop"]["rate"] if lwt else None
    store = [f"raw single-row INSERT: {num(raw_rate)}/s at {insert['params']['in_flight']} in flight "
             f"(p99 {ms(insert['closed_loop']['latency'].get('p99_us'))}); at half that rate "
             f"({num(half_raw['offered_rate'] if half_raw else None)}/s offered) p99 {ms(raw_p99_half)}",
             f"raw INSERT … IF NOT EXISTS (LWT): {num(lwt_rate)}/s at the same in flight"
             + (f" ({lwt_rate / raw_rate:.2f} of the INSERT rate)" if lwt_rate and raw_rate else "")]
    rows = []
    for variant in VARIANTS:
        top, half = cluster.get(f"{variant}-max"), cluster.get(f"{variant}-half")
        top_steps, half_steps = measured_steps(top), measured_steps(half)
        if not top_steps:
            continue
        t = top_steps[0]
        rate = t["acked"] / t["duration_s"]
        unanswered = t["sent"] - t["acked"] - sum(t["errors"].values())
        refused = ", ".join(f"{n:,} {code}" for code, n in sorted(t["errors"].items())) or "none"
        cores = (t.get("server_usage") or {}).get("cores")
        cpu_us = cores / rate * 1e6 if cores and rate else None
        requests = metric_mean(top.get("metrics_text"), "store_requests_per_send")
        trips = metric_mean(top.get("metrics_text"), "store_round_trips_per_send")
        h = half_steps[0] if half_steps else None
        half_p99 = h["ack_latency"].get("p99_us") if h else None
        rows.append({
            "build": variant,
            "offered": t["offered_rate"],
            "acked_per_s": round(rate),
            "refused": refused,
            "unanswered": unanswered,
            "ack_p50_us": t["ack_latency"].get("p50_us"),
            "ack_p99_us": t["ack_latency"].get("p99_us"),
            "half_rate": h["offered_rate"] if h else None,
            "half_ack_p50_us": h["ack_latency"].get("p50_us") if h else None,
            "half_ack_p99_us": half_p99,
            "half_unanswered": (h["sent"] - h["acked"] - sum(h["errors"].values())) if h else None,
            "gateway_cpu_us_per_send": round(cpu_us, 1) if cpu_us else None,
            "store_requests_per_send": round(requests, 2) if requests is not None else None,
            "store_round_trips_per_send": round(trips, 2) if trips is not None else None,
            "ratio_to_raw_insert": round(rate / raw_rate, 3) if raw_rate else None,
            "half_p99_over_raw_p99": round(half_p99 / raw_p99_half, 2) if half_p99 and raw_p99_half else None,
        })
    return store, rows


def cluster_markdown(store, rows):
    if not rows:
        return []
    lines = ["", "Two gateways (Redis + Cassandra), one-to-one, against the store itself, same run:", ""]
    lines += [f"- {line}" for line in store]
    lines += ["", "| build | offered | acked/s | ratio to raw INSERT/s | refused | unanswered at the end "
              "| ack p50 / p99 | at half the sustained rate: ack p50 / p99 (÷ raw INSERT p99) "
              "| gateway CPU per send (both) | store requests / round trips per send |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['build']} | {num(r['offered'])}/s | {num(r['acked_per_s'])} | {r['ratio_to_raw_insert']} "
            f"| {r['refused']} | {num(r['unanswered'])} | {ms(r['ack_p50_us'])} / {ms(r['ack_p99_us'])} "
            f"| {num(r['half_rate'])}/s: {ms(r['half_ack_p50_us'])} / {ms(r['half_ack_p99_us'])} "
            f"({r['half_p99_over_raw_p99']}) | {num(r['gateway_cpu_us_per_send'])} µs "
            f"| {num(r['store_requests_per_send'], 2)} / {num(r['store_round_trips_per_send'], 2)} |")
    return lines


def usages(results):
    """Every /proc sample pair of the run: steps, idle holds, connect runs."""
    for server in results.values():
        for result in server.values():
            for step in result.get("steps", []):
                if step.get("server_usage"):
                    yield step["server_usage"]
            server_usage = result.get("server_usage") or {}
            for usage in (server_usage.get("hold"), server_usage if "other_cores" in server_usage else None):
                if usage:
                    yield usage


def main():
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = load(work)
    stored = stored_bytes(work, results)
    meta = {
        "command": os.environ.get("BENCH_COMMAND", "bench/run.sh"),
        "date": os.environ.get("BENCH_DATE") or sh("date", "-u", "+%Y-%m-%dT%H:%M:%SZ"),
        "quick": bool(os.environ.get("BENCH_QUICK")),
        "failed": os.environ.get("BENCH_FAILED", "").split(),
        "machine": {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "kernel": platform.release(),
                    "memory_kib": int(next((l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                                            if l.startswith("MemTotal:")), "0"))},
        "pinning": os.environ.get("BENCH_PINNING", ""),
        "versions": {"kubechat": os.environ.get("BENCH_KUBECHAT_VERSION")
                     or sh("git", "rev-parse", "--short", "HEAD")
                     + ("" if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "gateway"]).returncode == 0
                        else " (with uncommitted gateway/ changes)"),
                     "rustc": sh("rustc", "--version"), "go": sh("go", "version"),
                     "centrifugo": os.environ.get("BENCH_CENTRIFUGO_VERSION", "")},
    }
    table = rows(results, stored)
    cluster_store, cluster = cluster_rows(load_cluster(work))
    samples = list(usages(results))
    meta["max_other_cores"] = round(max((u["other_cores"] for u in samples), default=0), 2)
    meta["max_client_cores"] = round(max((u["client_cores"] for u in samples), default=0), 2)
    report = dict(meta, table=[dict(zip(("workload", "kubechat", "centrifugo", "ratio"), r)) for r in table],
                  stored_bytes=stored, cluster={"store": cluster_store, "builds": cluster}, results=results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    m = meta["machine"]
    lines = [
        f"Measured {meta['date']} with `{meta['command']}`"
        + (" (quick: small sizes, not comparable with the full run)" if meta["quick"] else "") + ".",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), {round(m['memory_kib'] / 1024 / 1024)} GiB, "
        f"Linux {m['kernel']}; {meta['pinning']}.",
        f"Versions: kubechat {meta['versions']['kubechat']}, {meta['versions']['rustc']}; "
        f"{meta['versions']['centrifugo']}.",
        (f"During the measured intervals the load client used at most {meta['max_client_cores']} core and other "
         f"processes on the machine at most {meta['max_other_cores']} core"
         + (" (a busy machine: treat the numbers with care)." if meta["max_other_cores"] > 0.2 else ".")
         if samples else ""),
        "",
        "| workload | kubechat | Centrifugo | ratio kubechat ÷ Centrifugo |",
        "|---|---|---|---|",
    ]
    lines += [f"| {w} | {a} | {b} | {r} |" for w, a, b, r in table]
    lines += cluster_markdown(cluster_store, cluster)
    if meta["failed"]:
        lines += ["", "Runs that failed: " + ", ".join(meta["failed"]) + "."]
    (out / "latest.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
