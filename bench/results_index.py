"""The index of bench/results/: what each kept result is, the commit that added it and the command
in that commit's message; and the partial study runs that a merged study file holds whole.

    python -m bench.results_index            # writes bench/results/README.md
    python -m bench.results_index --prune    # first removes the superseded partial study runs (git keeps them)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def _study_rows(path: str) -> set:
    with open(path) as f:
        rows = json.load(f).get("rows", [])
    return {(r.get("mode"), r.get("method"), r.get("target_epsilon"), r.get("seed"), round(r["accuracy"], 10))
            for r in rows if "accuracy" in r}


def superseded(folder: str = RESULTS) -> dict:
    """{study JSON: a merged study JSON that holds every one of its runs, with the same accuracy}."""
    files = sorted(glob.glob(os.path.join(folder, "allocation-study-*.json")))
    rows = {f: _study_rows(f) for f in files}
    out = {}
    for a in files:
        bigger = [b for b in files if b != a and rows[a] and rows[a] < rows[b]]
        if bigger:
            out[a] = max(bigger, key=lambda b: len(rows[b]))
    return out


def _added_by(path: str) -> tuple[str, str]:
    """(short hash, subject) of the commit that added ``path``."""
    log = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h\t%ad\t%s", "--date=short", "--", path],
                         cwd=ROOT, capture_output=True, text=True).stdout.strip().splitlines()
    if not log:
        return "(not committed)", ""
    h, date, subject = log[-1].split("\t", 2)
    return f"{h} ({date})", subject


def index(folder: str = RESULTS) -> str:
    stems: dict = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isdir(path) or os.path.basename(path) == "README.md":
            continue
        rel = os.path.relpath(path, folder)
        stems.setdefault(os.path.splitext(rel)[0], []).append(rel)
    lines = ["# bench/results", "",
             "Every kept result, with the commit that added it; that commit's message names the command where "
             "one made it (study files also hold their configuration). The superseded partial study runs, whose "
             "every run a merged file holds, left the tree: `git log --diff-filter=D -- bench/results` lists "
             "them. Made by `python -m bench.results_index`.", "",
             "| result | files | added by | what, and the command |", "|---|---|---|---|"]
    for stem, files in stems.items():
        commit, subject = _added_by(os.path.join(folder, files[0]))
        exts = ", ".join(f"[{os.path.splitext(f)[1] or f}]({f})" for f in files)
        lines.append(f"| {stem} | {exts} | {commit} | {subject.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prune", action="store_true", help="remove the superseded partial study runs first")
    args = ap.parse_args(argv)
    if args.prune:
        for part, merged in superseded().items():
            stem = os.path.splitext(part)[0]
            for f in glob.glob(stem + ".*"):
                os.remove(f)
            print(f"removed {os.path.basename(stem)}.* (held whole by {os.path.basename(merged)})")
    with open(os.path.join(RESULTS, "README.md"), "w") as f:
        f.write(index())
    return 0


if __name__ == "__main__":
    sys.exit(main())
