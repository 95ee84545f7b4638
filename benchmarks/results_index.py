"""Write ``benchmarks/results/README.md``: every recorded result with the machine, commit and
date that its own files record.

    python benchmarks/results_index.py                  # regenerate the index
    python benchmarks/results_index.py --check          # exit 1 if the index is out of date
    python benchmarks/results_index.py --stamp FILE...  # record this machine, HEAD and FILE's
                                                        # date in FILE, then regenerate

Layout: one folder per kind of result (``cpu/``, ``gpu/``, ``fedsim/``, ``before-after/``,
``recipes/``), and in it one current result per benchmark under a stable name; older runs are
in git's history, not in the tree. A *result* is the files of one folder that share a stem
(``aggregation.json``, ``aggregation.md``, ``aggregation.png``: one run, its report and its
plot). Its machine, commit and date are read from the first of its files that has them, JSON
first:

* a pytest-benchmark JSON (``--benchmark-json``): ``machine_info`` (the CPU and its cores), the
  ``device_name`` of its benchmarks where that is not the CPU (a GPU), ``commit_info`` (the
  commit and whether the tree was dirty) and ``datetime``;
* any other JSON: a top-level ``"meta"`` object,
  ``{"machine": ..., "commit": ..., "date": ..., "what": ...}`` (``what`` optional);
* a markdown or text file: that object as the file's first line, inside an HTML comment (not
  shown when the markdown is rendered): ``<!-- meta {"machine": ..., "commit": ...} -->``.

``commit`` is the code that was measured; where a result does not say, its metadata reads
"recorded in SHA", the commit that added it. The index quotes what the files say and guesses
nothing: a result without metadata is listed as "not recorded". A result's description is, in
order: a summary of a pytest-benchmark JSON's groups, the first ``# `` heading of its markdown,
``meta["what"]``. ``recipes/`` (outputs of ``python -m fedsim.recipes``, which carry no such
metadata) is listed one entry per recipe, with its heading only.

A script that writes a result without metadata (all but the pytest-benchmark suites) is
followed by ``--stamp`` on its output: the machine (this CPU's model name and core count, or
``--machine TEXT``), ``git rev-parse --short HEAD`` (with "(dirty)" when tracked files differ
from it) and the file's modification date (UTC) go into the file's ``meta``; a PNG is left
alone (its JSON carries the metadata), a pytest-benchmark JSON too (it has its own).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
INDEX = RESULTS / "README.md"
META_LINE = re.compile(r"^<!-- meta (\{.*\}) -->\s*$")
FOLDERS = {  # the folders in the order listed, with what they hold
    "cpu": "the library's calls on a CPU (pytest-benchmark suites and scripts of `benchmarks/`)",
    "gpu": "the Triton kernel on a CUDA GPU",
    "fedsim": "the simulator: its speed against other simulators and its own wall time, and "
              "accuracy results",
    "before-after": "two trees side by side, before and after a change, each run alternating "
                    "on the same machine",
}
RECIPES = "recipes"
NOT_RECORDED = "not recorded"


def read_meta(path: Path) -> dict | None:
    """The metadata a file records (see the module docstring), or None."""
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        if "machine_info" in data and "commit_info" in data:
            return pytest_benchmark_meta(data)
        meta = data.get("meta")
        return dict(meta) if isinstance(meta, dict) else None
    if path.suffix in (".md", ".txt"):
        with path.open(encoding="utf-8") as f:
            match = META_LINE.match(f.readline())
        return json.loads(match[1]) if match else None
    return None


def pytest_benchmark_meta(data: dict) -> dict:
    cpu = data["machine_info"].get("cpu", {})
    brand = cpu.get("brand_raw") or data["machine_info"].get("machine", "")
    machine = f"{brand}, {cpu['count']} cores" if cpu.get("count") else brand
    devices = sorted({b.get("extra_info", {}).get("device_name") or "" for b in data["benchmarks"]})
    others = [d for d in devices if d and not d.startswith(brand)]
    if others:
        machine = f"{', '.join(others)} (host: {machine})"
    commit = data["commit_info"].get("id", "")[:7] or NOT_RECORDED
    if data["commit_info"].get("dirty"):
        commit += " (dirty)"
    return {"machine": machine, "commit": commit, "date": data.get("datetime", "")[:10],
            "what": groups_summary(data)}


def groups_summary(data: dict) -> str:
    """`benchmarks/test_x.py`: the distinct fields of its groups (``cpu|fp32|K=16|N=2^22``)."""
    tests = sorted({b["fullname"].split("::")[0] for b in data["benchmarks"]})
    groups = sorted({b.get("group") or "" for b in data["benchmarks"]})
    columns: list[list[str]] = []
    for group in groups:
        for i, field in enumerate(group.split("|")):
            if i == len(columns):
                columns.append([])
            if field not in columns[i]:
                columns[i].append(field)
    key = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]  # noqa: E731
    fields = []
    for values in columns:
        values = sorted(values, key=key)
        fields.append(", ".join(values) if len(values) <= 4 else f"{values[0]} … {values[-1]}")
    return (f"{', '.join(f'`{t}`' for t in tests)}: {len(groups)} "
            f"group{'s' if len(groups) != 1 else ''} ({' · '.join(fields)})")


def heading(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""


def results(folder: Path, recurse: bool = True) -> list[tuple[str, list[Path]]]:
    """The results of one folder: (stem, files), files JSON first, then the others by name."""
    stems: dict[str, list[Path]] = {}
    for path in sorted(p for p in (folder.rglob("*") if recurse else folder.iterdir())
                       if p.is_file()):
        if path == INDEX:
            continue
        relative = path.relative_to(folder)
        stem = str(relative.with_suffix(""))
        stems.setdefault(stem, []).append(path)
    order = lambda p: (p.suffix != ".json", p.suffix != ".md", p.name)  # noqa: E731
    return [(stem, sorted(files, key=order)) for stem, files in sorted(stems.items())]


def describe(files: list[Path]) -> tuple[dict, str]:
    """A result's metadata (from the first of its files that has some) and its description."""
    meta, source = {}, None
    for path in files:
        found = read_meta(path)
        if found:
            meta, source = found, path
            break
    if source is not None and source.suffix == ".json" and "machine_info" in _json(source):
        return meta, meta["what"]  # its groups say more than its report's generic title
    what = next((heading(p) for p in files if p.suffix == ".md" and heading(p)), "")
    return meta, what or meta.get("what", "")


def _json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def link(path: Path) -> str:
    return path.relative_to(RESULTS).as_posix()


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = [
        "# Recorded results",
        "",
        "Generated by `python benchmarks/results_index.py` from each result's own metadata (how "
        "it is read:",
        "that script's docstring); do not edit by hand. One current result per benchmark, under a "
        "stable",
        "name; older runs are in git's history. How to run the benchmarks: "
        "[../README.md](../README.md);",
        "what the results show: [docs/performance.md](../../docs/performance.md).",
    ]
    folders = [name for name in FOLDERS if (RESULTS / name).is_dir()]
    folders += sorted(p.name for p in RESULTS.iterdir()
                      if p.is_dir() and p.name not in FOLDERS and p.name != RECIPES)
    loose = results(RESULTS, recurse=False)
    for name in folders + ([""] if loose else []):
        folder = RESULTS / name if name else RESULTS
        entries = results(folder) if name else loose
        lines += ["", f"## {name}/" if name else "## (top level)", ""]
        if FOLDERS.get(name):
            lines += [FOLDERS[name][0].upper() + FOLDERS[name][1:] + ".", ""]
        lines += ["| result | files | what | machine | commit | date |",
                  "|---|---|---|---|---|---|"]
        for stem, files in entries:
            meta, what = describe(files)
            main = next((p for p in files if p.suffix == ".md"), files[0])
            others = " ".join(f"[`{p.suffix or p.name}`]({link(p)})" for p in files)
            lines.append("| " + " | ".join([
                f"[{stem}]({link(main)})", others, cell(what),
                cell(meta.get("machine", NOT_RECORDED)), cell(meta.get("commit", NOT_RECORDED)),
                cell(meta.get("date", NOT_RECORDED))]) + " |")
    recipes = RESULTS / RECIPES
    if recipes.is_dir():
        lines += ["", f"## {RECIPES}/", "",
                  "Outputs of `python -m fedsim.recipes` (a sweep's `summary.md`, `summary.json`, "
                  "plots and `sweep.toml`),",
                  "as written, with no metadata to read (some name their machine in the text): "
                  "what each shows and how",
                  "it was run,",
                  "[docs/fedsim-experiments.md](../../docs/fedsim-experiments.md#findings).", "",
                  "| recipe | what |", "|---|---|"]
        for entry in sorted(recipes.iterdir()):
            if entry.is_dir():
                page = next((entry / n for n in ("README.md", "summary.md", "results.md")
                             if (entry / n).exists()), None)
                target = link(page) if page else link(entry) + "/"
                what = heading(page) if page else ""
                if not what and (entry / "results.json").exists():
                    what = "a `python -m fedsim.run` run folder (results, metrics, config)"
                lines.append(f"| [{entry.name}/]({target}) | {cell(what)} |")
            elif entry.suffix == ".md":
                lines.append(f"| [{entry.name}]({link(entry)}) | {cell(heading(entry))} |")
    return "\n".join(lines) + "\n"


def this_machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def head_commit() -> str:
    root = RESULTS.parents[1]
    sha = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=root, check=True,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           check=True, capture_output=True, text=True).stdout.strip()
    return f"{sha} (dirty)" if dirty else sha


def stamp(path: Path, machine: str, commit: str) -> str:
    """Record machine, commit and the file's date in its metadata; say what was done."""
    times = path.stat()
    date = dt.datetime.fromtimestamp(times.st_mtime, dt.timezone.utc).strftime("%Y-%m-%d")
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        if not isinstance(data, dict) or "machine_info" in data:
            return f"{path}: left alone (pytest-benchmark metadata, or not a JSON object)"
        old = data.pop("meta", {}) if isinstance(data.get("meta"), dict) else {}
        meta = {"machine": machine, "commit": commit, "date": date}
        if old.get("what"):
            meta["what"] = old["what"]
        indent = 1 if text.startswith("{\n \"") else 2 if text.startswith("{\n") else None
        path.write_text(json.dumps({"meta": meta, **data}, indent=indent) + "\n",
                        encoding="utf-8")
    elif path.suffix in (".md", ".txt"):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        old = json.loads(META_LINE.match(lines[0])[1]) if lines and META_LINE.match(lines[0]) else {}
        meta = {"machine": machine, "commit": commit, "date": date}
        if old.get("what"):
            meta["what"] = old["what"]
        if old:
            lines = lines[1:]
        header = f"<!-- meta {json.dumps(meta, ensure_ascii=False)} -->\n"
        path.write_text(header + "".join(lines), encoding="utf-8")
    else:
        return f"{path}: left alone (its JSON carries the metadata)"
    os.utime(path, (times.st_atime, times.st_mtime))  # a second stamp reads the same date
    return f"{path}: {meta}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the index is stale")
    parser.add_argument("--stamp", nargs="+", type=Path, metavar="FILE",
                        help="record this machine, HEAD and each FILE's date in FILE")
    parser.add_argument("--machine", help="with --stamp: the machine, in words")
    args = parser.parse_args(argv)
    if args.stamp:
        machine, commit = args.machine or this_machine(), head_commit()
        for path in args.stamp:
            print(stamp(path, machine, commit))
    text = render()
    if args.check:
        current = INDEX.read_text(encoding="utf-8") if INDEX.exists() else ""
        if current != text:
            print(f"{INDEX} is out of date: run python benchmarks/results_index.py",
                  file=sys.stderr)
            return 1
        return 0
    INDEX.write_text(text, encoding="utf-8")
    print(f"wrote {INDEX}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
