#!/usr/bin/env python3
"""Turns benches/compare/run.sh's results.tsv into one Markdown table (medians and ratios).

Rows of results.tsv: scenario system rep value cpu_seconds work rss_kb extra
  S1 value Gb/s, work bytes        S2/S2b/S4 value req/s, work requests (extra errors=N)
  S3 value p50 us, work requests, extra p99 us     S6 value KB per idle conn per proxy
  RSS value MB per proxy (fresh, before any traffic)
"""
import sys
from collections import defaultdict
from statistics import median

# svidcar: pooled mTLS (default); -nopool: one resumed handshake per connection; -fullhs: one
# full handshake per connection (--no-pool --no-resumption, S4 only). envoy-l7 / svidcar-l7:
# the L7 pairs of S2b (Envoy HCM + RBAC; svidcar --policy with method/path rules).
ORDER = ["direct", "haproxy", "stunnel", "nginx", "envoy", "envoy-l7",
         "svidcar", "svidcar-nopool", "svidcar-fullhs", "svidcar-l7"]


def num(s):
    try:
        return float(s)
    except ValueError:
        return float("nan")


def fmt(x, nd=2):
    if x != x:  # nan
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def ratio(a, b):
    if a != a or b != b or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def main():
    path = sys.argv[1]
    conns = sys.argv[2] if len(sys.argv) > 2 else "1000"
    rows = defaultdict(list)
    for line in open(path):
        p = line.rstrip("\n").split("\t")
        if len(p) < 8:
            continue
        rows[(p[0], p[1])].append(p)

    def med(sc, sys_, f):
        vals = [f(r) for r in rows.get((sc, sys_), [])]
        vals = [v for v in vals if v == v]
        return median(vals) if vals else float("nan")

    value = lambda r: num(r[3])
    rss_mb = lambda r: num(r[6]) / 1024
    fresh = {s: med("RSS", s, value) for s in ORDER}

    out = [
        "| scenario | system | median | vs direct | vs haproxy | vs Envoy | proxy CPU | RSS both proxies (MB) | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def systems(sc):
        return [s for s in ORDER if (sc, s) in rows]

    # Throughput-like scenarios.
    spec = {
        "S1": ("Gb/s", lambda r: num(r[4]) / (num(r[5]) / 1e9) if num(r[5]) > 0 else float("nan"), "CPU-s/GB", 2),
        "S2": ("req/s", lambda r: num(r[4]) / num(r[5]) * 1e6 if num(r[5]) > 0 else float("nan"), "µs/req", 1),
        "S2b": ("req/s", lambda r: num(r[4]) / num(r[5]) * 1e6 if num(r[5]) > 0 else float("nan"), "µs/req", 1),
        "S4": ("conn/s", lambda r: num(r[4]) / num(r[5]) * 1e3 if num(r[5]) > 0 else float("nan"), "ms/conn", 2),
    }
    for sc in ["S1", "S2", "S2b", "S3", "S4", "S6"]:
        if not systems(sc):
            continue
        if sc in spec:
            unit, cpu_f, cpu_unit, nd = spec[sc]
            base_d = med(sc, "direct", value) if sc != "S2b" else med("S2", "direct", value)
            base_h = med(sc, "haproxy", value)
            # S2b: against Envoy's L7 pair (HCM + RBAC), the L7 shape svidcar-l7 competes with.
            base_e = med(sc, "envoy", value) if sc != "S2b" else med(sc, "envoy-l7", value)
            for s in systems(sc):
                if sc == "S2b" and all(r[3] == "n/a" for r in rows[(sc, s)]):
                    out.append(f"| S2b | {s} | n/a (L7 policy not wired) | | | | | | |")
                    continue
                m = med(sc, s, value)
                errs = sum(
                    int(x.split("=")[1]) for r in rows[(sc, s)] for x in r[7].split() if x.startswith("errors=")
                )
                note = f" ({errs} errors)" if errs else ""
                cpu = "—" if s == "direct" else f"{fmt(med(sc, s, cpu_f), nd)} {cpu_unit}"
                rss = "—" if s == "direct" else fmt(med(sc, s, rss_mb), 1)
                name = "haproxy (L4)" if sc == "S2b" and s == "haproxy" else s
                out.append(
                    f"| {sc} | {name} | {fmt(m)} {unit}{note} | {ratio(m, base_d)} | {ratio(m, base_h)} | {ratio(m, base_e)} "
                    f"| {cpu} | {rss} | {len(rows[(sc, s)])} |"
                )
        elif sc == "S3":
            p50 = {s: med(sc, s, value) for s in systems(sc)}
            p99 = {s: med(sc, s, lambda r: num(r[7])) for s in systems(sc)}
            d50, d99 = p50.get("direct", float("nan")), p99.get("direct", float("nan"))

            def vs(s, peer):
                # A ratio of added latencies only means something when both are positive
                # (on a loaded machine the direct p99 can exceed a proxied one).
                a50, a99 = p50[s] - d50, p99[s] - d99
                b50, b99 = p50.get(peer, float("nan")) - d50, p99.get(peer, float("nan")) - d99
                r50 = ratio(a50, b50) if a50 > 0 and b50 > 0 else "—"
                r99 = ratio(a99, b99) if a99 > 0 and b99 > 0 else "— (noise)"
                return f"added p50 {r50}, p99 {r99}" if peer in p50 else "—"

            for s in systems(sc):
                fig = f"p50 {fmt(p50[s] / 1000)} / p99 {fmt(p99[s] / 1000)} ms"
                if s == "direct":
                    added, vs_h, vs_e, cpu, rss = "(baseline)", "—", "—", "—", "—"
                else:
                    added = f"{(p50[s] - d50) / 1000:+.2f} / {(p99[s] - d99) / 1000:+.2f} ms"
                    vs_h, vs_e = vs(s, "haproxy"), vs(s, "envoy")
                    cpu = f"{fmt(med(sc, s, lambda r: num(r[4]) / num(r[5]) * 1e6 if num(r[5]) > 0 else float('nan')), 1)} µs/req"
                    rss = fmt(med(sc, s, rss_mb), 1)
                out.append(f"| S3 | {s} | {fig} | {added} | {vs_h} | {vs_e} | {cpu} | {rss} | {len(rows[(sc, s)])} |")
        elif sc == "S6":
            # One group per connection count (extra "conns=N"; older results: argv[2]).
            def n_conns(r):
                return next((x.split("=")[1] for x in r[7].split() if x.startswith("conns=")), conns)

            counts = sorted({n_conns(r) for s in systems(sc) for r in rows[(sc, s)]}, key=int)
            for c in counts:
                at = lambda s: [r for r in rows[(sc, s)] if n_conns(r) == c]
                mc = lambda s, f: median([f(r) for r in at(s)]) if at(s) else float("nan")
                base_h, base_e = mc("haproxy", value), mc("envoy", value)
                for s in [s for s in systems(sc) if at(s)]:
                    m = mc(s, value)
                    out.append(
                        f"| S6 | {s} | {fmt(m, 1)} KB/idle conn/proxy ({c} conns); idle {fmt(fresh.get(s, float('nan')), 1)} MB/proxy "
                        f"| — | {ratio(m, base_h)} | {ratio(m, base_e)} | — | {fmt(mc(s, rss_mb), 1)} | {len(at(s))} |"
                    )
    print("\n".join(out))
    print()
    print("vs direct / vs haproxy / vs Envoy: ratio of the medians (higher is better for rates; for S3 the "
          "added latency over direct; for S6 memory per connection, lower is better; for S2b vs Envoy is "
          "against Envoy's L7 pair, HCM + RBAC, and haproxy runs L4). Proxy CPU: "
          "both proxies' utime+stime over the run (/proc/<pid>/stat), per unit of work. RSS: sum "
          "of both proxies at the end of the run; S6 'idle' = fresh RSS per proxy before any traffic.")


if __name__ == "__main__":
    main()
