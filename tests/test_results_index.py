"""bench/results_index.py: a partial study run is superseded only when a merged file holds every run of
it with the same accuracy; the committed index lists every kept result."""
import json
import os

from bench import results_index as RI


def _study(path, runs):
    path.write_text(json.dumps({"rows": [{"mode": "lora", "method": m, "target_epsilon": 3.0, "seed": s,
                                          "accuracy": a} for m, s, a in runs]}))


def test_superseded_needs_every_run_with_the_same_accuracy(tmp_path):
    _study(tmp_path / "allocation-study-a.json", [("uniform", 0, 0.7)])
    _study(tmp_path / "allocation-study-b.json", [("uniform", 0, 0.7), ("anadp", 0, 0.71)])
    _study(tmp_path / "allocation-study-c.json", [("uniform", 0, 0.6999)])  # another accuracy: not held
    sup = RI.superseded(str(tmp_path))
    assert {os.path.basename(k): os.path.basename(v) for k, v in sup.items()} == {
        "allocation-study-a.json": "allocation-study-b.json"}


def test_the_committed_index_lists_every_kept_result():
    index = open(os.path.join(RI.RESULTS, "README.md")).read()
    for root, _, files in os.walk(RI.RESULTS):
        for f in files:
            if f != "README.md":
                rel = os.path.relpath(os.path.join(root, f), RI.RESULTS)
                assert f"({rel})" in index, rel
    assert not RI.superseded()  # pruned
