"""anadp/apps/sentence_head.py: the head on a checkpoint's mean-pooled, normalized sentence embedding."""
import json

import pytest
import torch

import zoo
from test_norms import check_norms

pytest.importorskip("transformers")


def _tiny(seed=0):
    from transformers import BertConfig, BertModel

    from anadp.apps.sentence_head import SentenceClassifier
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=zoo.VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    return SentenceClassifier(BertModel(cfg), 2).double().eval()


def test_checkpoint_pooling_reads_the_sentence_transformers_config(tmp_path):
    from anadp.apps.sentence_head import checkpoint_pooling
    assert checkpoint_pooling(str(tmp_path)) == "cls"  # a plain Hugging Face directory
    (tmp_path / "1_Pooling").mkdir()
    for mean, want in ((True, "mean"), (False, "cls")):
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": mean,
                                                                        "pooling_mode_cls_token": not mean}))
        assert checkpoint_pooling(str(tmp_path)) == want


@torch.no_grad()
def test_padding_changes_nothing_and_the_feature_is_the_normalized_mean():
    model = _tiny()
    b = zoo.batch("text", B=4, dtype=torch.float64)
    ids, mask = b["input_ids"], b["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask).logits
    k = int(mask[1].sum())  # sample 1 is padded: alone and unpadded it gives the same logits
    alone = model(input_ids=ids[1:2, :k], attention_mask=mask[1:2, :k]).logits
    assert float((out[1] - alone[0]).abs().max()) < 1e-12
    h = model.body(input_ids=ids[1:2, :k]).last_hidden_state[0]
    feature = h.mean(0) / h.mean(0).norm()
    want = model.classifier(feature)
    assert float((alone[0] - want).abs().max()) < 1e-12


def test_per_sample_norms_are_exact():
    # the pooling is parameter-free: the engine's per-sample norms of the encoder and the head equal the float64
    # one-sample-at-a-time autograd reference, with a padded sample in the batch
    model = _tiny(seed=1)
    check_norms(model, zoo.batch("text", B=4, dtype=torch.float64), 4, torch.float64, out_of=lambda o: o.logits)


def test_finetune_loads_the_pooling_the_checkpoint_was_trained_with(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from anadp.apps.finetune import load_model
    from anadp.apps.sentence_head import SentenceClassifier
    cfg = BertConfig(vocab_size=zoo.VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    assert not isinstance(load_model(str(tmp_path), 2, False, 4, pooling="auto"), SentenceClassifier)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    model = load_model(str(tmp_path), 2, False, 4, pooling="auto")
    assert isinstance(model, SentenceClassifier)
    # a non-private run keeps the model's own head: it trains the pooler and did better on it
    assert not isinstance(load_model(str(tmp_path), 2, False, 4, pooling="auto", dp=False), SentenceClassifier)
    assert isinstance(load_model(str(tmp_path), 2, False, 4, pooling="mean", dp=False), SentenceClassifier)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trained and not any("pooler" in n for n in trained)
    lora = load_model(str(tmp_path), 2, True, 4, pooling="mean")
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any("classifier" in n for n in trained)
    assert all("lora" in n or "classifier" in n for n in trained)
    with pytest.raises(ValueError, match="pooling must be"):
        load_model(str(tmp_path), 2, False, 4, pooling="max")
