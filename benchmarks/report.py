"""Tables and a plot from the aggregation benchmarks' pytest-benchmark JSON.

    python benchmarks/report.py results.json [more.json ...] [-o report.md] [--plot out.png]
                                [--metric bandwidth|time]

Writes markdown (stdout without ``-o``): per (device, dtype, K, N) group, each contender's
median time, achieved GB/s (minimum traffic / median), that as a % of the session's copy
bandwidth, peak extra memory, first-call time, correctness error and the speedup of our
backends (gma_step[torch], gma_step[triton]) over it, and on a GPU the same call timed back to
back (CUDA events around a loop, host work overlapped) against a copy timed the same way; then a
summary grid and the project's targets (CPU: K=16, N=2^22 fp32; GPU: K >= 8, N >= 2^24).
``--plot`` draws GB/s (or time) against N, one line per contender, one panel per K, one row of panels per (device, dtype).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

OURS = ("gma_step[torch]", "gma_step[triton]")
CONTENDER_ORDER = ("gma_step[triton]", "gma_step[triton,unchecked]", "gma_step[torch]",
                   "gma_step[torch,unchecked]", "gma_step[torch,pure]", "gma_step[torch,list]",
                   "accumulator[triton]", "accumulator[torch]", "naive_eager", "naive_compile",
                   "flower_fedavg", "declearn_gma")
DTYPE_ORDER = ("fp32", "bf16")
#: targets the project set for itself, checked on CPU at K=16, N=2^22, fp32
TARGET_GROUP = ("cpu", "fp32", 16, 1 << 22)
TARGETS = (("flower_fedavg", 4.0), ("naive_eager", 5.0))
TARGET_MEMORY_PER_N4 = 3.0
NOISY_FOREIGN_CPU = 0.25   # other processes used > 25% of the machine's CPU during the timing


def load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(aggregation records, other benchmarks): each one's extra_info plus the stats
    pytest-benchmark kept and the commit it recorded."""
    rows, others = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        commit = data.get("commit_info", {})
        for bench in data["benchmarks"]:
            info = dict(bench.get("extra_info", {}))
            stats = bench.get("stats", {})
            info.setdefault("median_s", stats.get("median"))
            info.setdefault("min_s", stats.get("min"))
            info.update(source=path, commit=commit.get("id"), dirty=commit.get("dirty"),
                        name=bench.get("name"), group_name=bench.get("group"),
                        datetime=info.get("run_datetime") or data.get("datetime"))
            (rows if "contender" in info else others).append(info)
    return rows, others


def _order(name: str) -> int:
    return CONTENDER_ORDER.index(name) if name in CONTENDER_ORDER else len(CONTENDER_ORDER)


def group_key(row: dict) -> tuple:
    return (row["device"], row["dtype"], row["K"], row["N"])


def _sort_key(key: tuple) -> tuple:
    device, dtype, k, n = key
    dt = DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else 9
    return (device != "cpu", device, dt, k, n)


def grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        groups[group_key(row)][row["contender"]] = row   # a later file wins
    return {key: sorted(groups[key].values(), key=lambda r: _order(r["contender"]))
            for key in sorted(groups, key=_sort_key)}


def _p2(n: int) -> str:
    e = math.log2(n)
    return f"2^{int(e)}" if e.is_integer() else str(n)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / (1 << 20):.1f}"


def _noise(row: dict) -> float | None:
    wall, foreign, cpus = row.get("load_wall_s"), row.get("foreign_cpu_s"), row.get("cpu_count")
    if not wall or foreign is None or not cpus:
        return None
    return foreign / (wall * cpus)


def group_table(key: tuple, rows: list[dict]) -> list[str]:
    device, dtype, k, n = key
    by_name = {r["contender"]: r for r in rows}
    ours = [name for name in OURS if name in by_name]
    first = rows[0]
    lines = [f"### {device} {dtype} K={k} N={_p2(n)}", "",
             f"{first.get('device_name', device)}; minimum traffic {first['bytes'] / 1e6:.1f} MB; "
             f"copy bandwidth {first.get('copy_gbps', float('nan')):.1f} GB/s; read floor "
             f"(``updates.sum()``, timed beside each contender) {_ms(first.get('read_floor_s'))} ms"
             + (f" (back to back {first['copy_b2b_gbps']:.1f} GB/s)"
                if first.get("copy_b2b_gbps") else ""), ""]
    head = ["contender", "median ms", "× read floor", "GB/s", "% copy BW", "peak extra MiB",
            "extra / (N·4)",
            "first call ms", "rel. L2 err", "other CPU %"]
    b2b = any(r.get("b2b_s") for r in rows)
    if b2b:
        head += ["back-to-back ms", "back-to-back % copy BW"]
    head += [f"{name} speedup" for name in ours]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        median = row.get("median_s")
        noise = _noise(row)
        flag = " †" if noise is not None and noise > NOISY_FOREIGN_CPU else ""
        first_call = _ms(row.get("first_call_s"))
        if row.get("compile_s") is not None:
            first_call += f" (compile {row['compile_s']:.1f} s)"
        err = row.get("correctness", {}).get("rel_l2_err")
        cells = [f"`{row['contender']}`" + (" (host)" if row.get("host_side") else ""),
                 _ms(median) + flag,
                 f"{row['vs_read_floor']:.2f}" if row.get("vs_read_floor") else "-",
                 f"{row['gbps']:.2f}" if row.get("gbps") is not None else "-",
                 f"{100 * row['frac_copy_bw']:.1f}" if row.get("frac_copy_bw") is not None else "-",
                 _mib(row.get("peak_extra_bytes")),
                 f"{row['peak_extra_per_N4']:.2f}" if row.get("peak_extra_per_N4") is not None
                 else "-",
                 first_call,
                 f"{err:.1e}" if err is not None else "-",
                 f"{100 * noise:.0f}" if noise is not None else "-"]
        if b2b:
            cells += [_ms(row.get("b2b_s")),
                      f"{100 * row['b2b_frac_copy_bw']:.1f}" if row.get("b2b_s") else "-"]
        for name in ours:
            mine = by_name[name].get("median_s")
            cells.append(f"{median / mine:.2f}x" if median and mine else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def summary_grid(groups: dict[tuple, list[dict]]) -> list[str]:
    names = sorted({r["contender"] for rows in groups.values() for r in rows}, key=_order)
    head = ["device", "dtype", "K", "N"] + [f"`{n}`" for n in names]
    lines = ["## Median time (ms) per group", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for (device, dtype, k, n), rows in groups.items():
        by_name = {r["contender"]: r for r in rows}
        cells = [device, dtype, str(k), _p2(n)]
        cells += [_ms(by_name[name].get("median_s")) if name in by_name else "" for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def targets_section(groups: dict[tuple, list[dict]]) -> list[str]:
    rows = groups.get(TARGET_GROUP)
    if not rows:
        return []
    by_name = {r["contender"]: r for r in rows}
    ours = by_name.get("gma_step[torch]")
    if ours is None or not ours.get("median_s"):
        return []
    lines = ["## Targets (CPU, fp32, K=16, N=2^22, `gma_step[torch]`)", "",
             "| target | measured | met |", "|---|---|---|"]
    for name, factor in TARGETS:
        other = by_name.get(name)
        if other is None or not other.get("median_s"):
            lines.append(f"| >= {factor:g}x faster than `{name}` | not measured | - |")
            continue
        speedup = other["median_s"] / ours["median_s"]
        lines.append(f"| >= {factor:g}x faster than `{name}` | {speedup:.2f}x "
                     f"({_ms(ours['median_s'])} ms vs {_ms(other['median_s'])} ms) | "
                     f"{'yes' if speedup >= factor else 'no'} |")
    compiled = by_name.get("naive_compile")
    if compiled is not None and compiled.get("median_s"):
        lines.append(f"| (for reference) vs `naive_compile` | "
                     f"{compiled['median_s'] / ours['median_s']:.2f}x, compile "
                     f"{compiled.get('compile_s', float('nan')):.1f} s | - |")
    per_n4 = ours.get("peak_extra_per_N4")
    if per_n4 is not None:
        lines.append(f"| peak extra memory < {TARGET_MEMORY_PER_N4:g}·N·4 bytes | "
                     f"{per_n4:.2f}·N·4 ({_mib(ours['peak_extra_bytes'])} MiB) | "
                     f"{'yes' if per_n4 < TARGET_MEMORY_PER_N4 else 'no'} |")
    lines.append("")
    return lines


GPU_TARGET_BW = 0.85        # of the copy bandwidth
GPU_TARGET_VS_NAIVE = 4.0   # x faster than naive eager; and no slower than torch.compile


def gpu_targets_section(groups: dict[tuple, list[dict]]) -> list[str]:
    """Issue 5's GPU targets at K >= 8, N >= 2^24: the kernel's share of the copy bandwidth
    (back to back, and per synchronized call with and without the guard), and its speedup over
    the naive eager formula and over torch.compile of it (per synchronized call and back to
    back)."""
    head = ["dtype", "K", "N", "kernel, back to back (unchecked)", "per call, unchecked",
            "per call, guard", "vs naive eager: per call / back to back",
            "vs torch.compile: per call (guard / unchecked) / back to back (unchecked)"]
    lines = []
    for (device, dtype, k, n), rows in groups.items():
        by = {r["contender"]: r for r in rows}
        guard, free = by.get("gma_step[triton]"), by.get("gma_step[triton,unchecked]")
        if device != "cuda" or k < 8 or n < (1 << 24) or not (guard and free):
            continue
        pct = lambda r, key: f"{100 * r[key]:.0f} %" if r.get(key) else "-"  # noqa: E731

        def ratio(name: str, ours: dict, key: str = "median_s") -> str:
            other = by.get(name, {}).get(key)
            return f"{other / ours[key]:.2f}x" if other and ours.get(key) else "-"
        lines.append(f"| {dtype} | {k} | {_p2(n)} | {pct(free, 'b2b_frac_copy_bw')} | "
                     f"{pct(free, 'frac_copy_bw')} | {pct(guard, 'frac_copy_bw')} | "
                     f"{ratio('naive_eager', guard)} / {ratio('naive_eager', free, 'b2b_s')} | "
                     f"{ratio('naive_compile', guard)} / {ratio('naive_compile', free)} / "
                     f"{ratio('naive_compile', free, 'b2b_s')} |")
    if not lines:
        return []
    return [f"## GPU targets (K >= 8, N >= 2^24; targets: >= {100 * GPU_TARGET_BW:.0f} % of copy "
            f"bandwidth, >= {GPU_TARGET_VS_NAIVE:g}x naive eager, >= 1x torch.compile)", "", "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head)] + lines + [""]


def environment(rows: list[dict]) -> list[str]:
    first = rows[0]
    versions = ", ".join(f"{name} {first.get(name + '_version')}"
                         for name in ("torch", "triton", "flwr", "declearn", "numpy")
                         if first.get(name + "_version"))
    devices = sorted({(r["device"], r.get("device_name", "")) for r in rows})
    copy: dict[str, set] = defaultdict(set)
    for r in rows:
        copy[r["device"]].add(round(r.get("copy_gbps", 0.0), 1))
    methods = sorted({r.get("memory_method", "") for r in rows})
    commits = sorted({(r.get("commit") or "?")[:10] + (" + uncommitted changes" if r.get("dirty")
                                                      else "") for r in rows})
    sources = sorted({r.get("gma_kernels_src_sha1", "?") for r in rows})
    dates = sorted({r.get("datetime", "?")[:19] for r in rows})
    lines = ["# gma-kernels aggregation benchmarks", "",
             f"* run {', '.join(dates)} on commit {', '.join(commits)}; gma_kernels sources "
             f"sha1 {', '.join(sources)}",
             f"* versions: {versions}; Python {first.get('python_version')}"]
    lines += [f"* {device}: {name}" for device, name in devices]
    lines += [f"* copy bandwidth ({device}, `dst.copy_(src)`, bytes = 2 x size): "
              f"{', '.join(map(str, sorted(values)))} GB/s"
              + (" (one per session; each row uses its own session's)" if len(values) > 1 else "")
              for device, values in sorted(copy.items())]
    lines += [f"* peak extra memory: {m}" for m in methods if m]
    lines += ["* GB/s = minimum traffic (K·N·itemsize + 8·N: each update read once, params read "
              "and written once) / median time, for every contender alike",
              "* speedup = contender's median / ours (> 1: ours is faster)",
              f"* † other processes used more than {int(100 * NOISY_FOREIGN_CPU)}% of the "
              "machine's CPU while that contender was timed: a noisy figure", ""]
    return lines


def others_section(others: list[dict]) -> list[str]:
    if not others:
        return []
    lines = ["## Other benchmarks", "", "| group | benchmark | median ms |", "|---|---|---|"]
    for row in others:
        group = str(row.get("group_name")).replace("|", "\\|")
        lines.append(f"| {group} | `{row.get('name')}` | {_ms(row.get('median_s'))} |")
    return lines + [""]


def markdown(rows: list[dict], others: list[dict] = ()) -> str:
    groups = grouped(rows)
    lines = (environment(rows) + targets_section(groups) + gpu_targets_section(groups)
             + summary_grid(groups))
    lines += ["## Per group", ""]
    for key, group_rows in groups.items():
        lines += group_table(key, group_rows)
    lines += others_section(list(others))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, metric: str = "bandwidth") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["device"], r["dtype"]) for r in rows},
                    key=lambda p: (p[0] != "cpu", p[0], DTYPE_ORDER.index(p[1])
                                   if p[1] in DTYPE_ORDER else 9))
    ks = sorted({r["K"] for r in rows})
    names = sorted({r["contender"] for r in rows}, key=_order)
    cmap = plt.get_cmap("tab20")
    shades = list(range(0, 20, 2)) + list(range(1, 20, 2))    # the dark shades first
    colors = {name: cmap(shades[i % 20]) for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(panels), len(ks), figsize=(3.4 * len(ks), 3.0 * len(panels)),
                             squeeze=False, sharex=True)
    for i, (device, dtype) in enumerate(panels):
        for j, k in enumerate(ks):
            ax = axes[i][j]
            sel = [r for r in rows if (r["device"], r["dtype"], r["K"]) == (device, dtype, k)
                   and r.get("median_s")]
            for name in names:
                pts = sorted((r["N"], r["gbps"] if metric == "bandwidth" else 1e3 * r["median_s"])
                             for r in sel if r["contender"] == name)
                if pts:
                    style = "-" if name in OURS else "--" if "gma_step" in name or \
                        "accumulator" in name else ":"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                            markersize=3 if len(pts) > 1 else 6, color=colors[name], label=name)
            copy = [r.get("copy_gbps") for r in sel if r.get("copy_gbps")]
            if metric == "bandwidth" and copy:
                ax.axhline(max(copy), color="grey", linewidth=0.8, linestyle="-.",
                           label="copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{device} {dtype} K={k}", fontsize=9)
            ax.grid(True, which="both", linewidth=0.3)
            if i == len(panels) - 1:
                ax.set_xlabel("N (elements per update)")
            if j == 0:
                ax.set_ylabel("GB/s (min. traffic / median)" if metric == "bandwidth"
                              else "median ms")
    handles: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    ncol = max(1, min(len(handles), int(fig.get_figwidth() / 2.3)))
    legend_rows = math.ceil(len(handles) / ncol)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, min(0.4, 0.25 * legend_rows / fig.get_figheight()), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    parser.add_argument("-o", "--output", help="markdown file (default: stdout)")
    parser.add_argument("--plot", help="PNG file for the plot")
    parser.add_argument("--metric", choices=("bandwidth", "time"), default="bandwidth")
    args = parser.parse_args(argv)
    rows, others = load(args.json)
    if not rows:
        print("no aggregation benchmark with extra_info in the input", file=sys.stderr)
        return 1
    text = markdown(rows, others)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    if args.plot:
        plot(rows, args.plot, args.metric)
    return 0


if __name__ == "__main__":
    sys.exit(main())
