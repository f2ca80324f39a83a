#!/usr/bin/python3
"""Scrapes a running proxy's /metrics for a while and draws the main panels
of docker/grafana/shardline.json from what it read (the same queries:
rates of counters, histogram quantiles, the hot-key and skew gauges), as
one PNG. It is how the README's dashboard picture is made, without a
Prometheus or Grafana server:

    shardline demo --port 6543 &          # prints the /metrics URL
    pgbench ... &                         # any load through the proxy
    scripts/dashboard-snapshot.py --url http://127.0.0.1:PORT/metrics \\
        --seconds 120 --out docs/dashboard.png

Needs python3-matplotlib (Debian's package).
"""

import argparse
import re
import time
import urllib.request
from collections import defaultdict

LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{(name, frozenset(labels)): value} of one scrape."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        out[(name, frozenset(LABEL.findall(labels)))] = float(value)
    return out


def scrape(url, seconds, interval):
    samples = []
    start = time.monotonic()
    while time.monotonic() - start <= seconds:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        samples.append((time.monotonic() - start, parse(body)))
        time.sleep(interval)
    return samples


def series(scrape, name, by):
    """Sum of `name`'s samples grouped by the labels in `by`."""
    out = defaultdict(float)
    for (n, labels), v in scrape.items():
        if n == name:
            d = dict(labels)
            out[tuple(d.get(b, "") for b in by)] += v
    return out


def rates(samples, name, by):
    """Per-second increase of a counter between consecutive scrapes."""
    lines = defaultdict(list)
    for (t0, a), (t1, b) in zip(samples, samples[1:]):
        sa, sb = series(a, name, by), series(b, name, by)
        for k in sb:
            lines[k].append((t1, max(sb[k] - sa.get(k, 0.0), 0.0) / (t1 - t0)))
    return lines


def quantile(q, buckets):
    """Prometheus's histogram_quantile over [(le, cumulative count)]."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower


def quantiles(samples, name, q, by):
    """q-quantile of a histogram's increase between scrapes, per `by` group."""
    lines = defaultdict(list)
    bucket = name + "_bucket"
    for (_, a), (t1, b) in zip(samples, samples[1:]):
        groups = defaultdict(lambda: defaultdict(float))
        for key, v in b.items():
            if key[0] != bucket:
                continue
            d = dict(key[1])
            le = float("inf") if d["le"] == "+Inf" else float(d["le"])
            groups[tuple(d.get(x, "") for x in by)][le] += v - a.get(key, 0.0)
        for g, bs in groups.items():
            v = quantile(q, list(bs.items()))
            if v is not None:
                lines[g].append((t1, v))
    return lines


def gauges(samples, name, by):
    lines = defaultdict(list)
    for t, s in samples:
        for k, v in series(s, name, by).items():
            lines[k].append((t, v))
    return lines


def plot(ax, title, lines, fmt=lambda k: " ".join(k) or "all", scale=1.0, unit=""):
    for k, pts in sorted(lines.items()):
        if pts and any(v for _, v in pts):
            ax.plot([t for t, _ in pts], [v * scale for _, v in pts], label=fmt(k), linewidth=1.2)
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="upper left")


def bars(ax, title, items):
    items = items[:8]
    ax.barh([k for k, _ in items][::-1], [v * 100 for _, v in items][::-1], color="#3274d9")
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v * 100, i, f" {v * 100:.1f}%", va="center", fontsize=7)
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xlabel("%", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlim(0, 100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--interval", type=float, default=2)
    ap.add_argument("--out", default="dashboard.png")
    args = ap.parse_args()
    samples = scrape(args.url, args.seconds, args.interval)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 10))
    a = axes.flat
    plot(next(a), "Statements per second by placement",
         rates(samples, "shardline_units_placed_total", ["placement"]), unit="ops/s")
    lat = {}
    for q in (0.5, 0.95, 0.99):
        for _, pts in quantiles(samples, "shardline_query_duration_seconds", q, []).items():
            lat[(f"p{round(q * 100)}",)] = pts
    plot(next(a), "Statement latency", lat, scale=1000, unit="ms")
    plot(next(a), "p99 latency by shard and role",
         quantiles(samples, "shardline_shard_query_duration_seconds", 0.99, ["shard", "role"]),
         scale=1000, unit="ms")
    pools = {}
    for label, name in [("clients active", "shardline_clients_active"),
                        ("clients waiting", "shardline_clients_waiting"),
                        ("server conns active", "shardline_pool_server_connections_active"),
                        ("server conns idle", "shardline_pool_server_connections_idle")]:
        for _, pts in gauges(samples, name, []).items():
            pools[(label,)] = pts
    plot(next(a), "Pools", pools, unit="connections")
    errors = {("class " + k[0],): v for k, v in rates(samples, "shardline_errors_total", ["class"]).items()}
    errors.update({("0A000 " + k[0],): v for k, v in rates(samples, "shardline_refusals_total", ["construct"]).items()})
    plot(next(a), "Errors by SQLSTATE class, refusals by construct", errors, unit="per s")
    plot(next(a), "Replica replay lag",
         gauges(samples, "shardline_node_replay_lag_bytes", ["shard", "node"]), scale=1 / 1024, unit="KiB")
    ryw = rates(samples, "shardline_read_your_writes_primary_reads_total", [])
    ryw = {("reads sent to a primary (replica behind)",): v for v in ryw.values()}
    plot(next(a), "Read-your-writes", ryw, unit="reads/s")
    last = samples[-1][1]
    skew = sorted(series(last, "shardline_shard_traffic_share", ["shard"]).items())
    bars(next(a), "Shard share of keyed statements (skew)", [(k[0], v) for k, v in skew])
    hot = sorted(series(last, "shardline_hot_key_group_share", ["table_group", "key", "shard"]).items(),
                 key=lambda kv: -kv[1])
    bars(next(a), "Hot keys: share of their table group",
         [(f"{g} key {k} ({s})", v) for (g, k, s), v in hot])
    fig.suptitle("Shardline: shardline demo under pgbench, scraped every "
                 f"{args.interval:g}s for {args.seconds:g}s (x axis: seconds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"{len(samples)} scrapes drawn into {args.out}")


if __name__ == "__main__":
    main()
