"""Rewards against Hugging Face's own forward, pooling at the last real token, init and dropout."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, Qwen2Config

from minrm.config import parse_args
from minrm.data import toy
from minrm.data.batching import collate, pad_right
from minrm.data.tokenizer import load_tokenizer
from minrm.model.reward import prepare, read_model, reward_forward
from tests.conftest import tiny_llama_config

PAD = 0


def tiny_qwen2_config(vocab_size: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        tie_word_embeddings=False,
    )


def random_rows(vocab: int, lengths: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"prompt": [], "responses": [torch.randint(1, vocab, (n,), generator=g).tolist() for n in pair], "scores": [1, 0]}
        for pair in lengths
    ]


def load_model(args, tokenizer):
    """The whole model as the scorer builds it: read, then set up to run."""
    return prepare(read_model(args, tokenizer), args)


@pytest.mark.parametrize("make_config", [tiny_llama_config, tiny_qwen2_config], ids=["llama", "qwen2"])
def test_rewards_match_hf_on_right_padded_batches(make_config):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(make_config(100)).eval()
    model.config.pad_token_id = PAD
    rows = random_rows(100, [(5, 17), (23, 3), (11, 11)])
    batch = pad_right([s for r in rows for s in r["responses"]], PAD)
    with torch.no_grad():
        ours = reward_forward(model, **collate(rows, PAD, "padded")[0])  # read at the collator's last_index
        theirs = model(**batch).logits.squeeze(-1)  # HF pools at the rightmost non-pad token
    assert ours.shape == (6,)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_pooling_when_the_batch_has_more_sequences_than_tokens():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(100)).eval()
    model.config.pad_token_id = PAD
    rows = random_rows(100, [(2, 3)] * 5)
    batch = pad_right([s for r in rows for s in r["responses"]], PAD)  # (10, 3)
    with torch.no_grad():
        ours = reward_forward(model, **collate(rows, PAD, "padded")[0])
        torch.testing.assert_close(ours, model(**batch).logits.squeeze(-1))


def test_pooling_reads_the_last_token_even_when_the_pad_id_is_in_the_text():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(50)).eval()
    # PAD occurs inside the first sequence and is the real last token of the second.
    seqs = [[7, PAD, 9, 4, PAD, 12], [3, 8, PAD]]
    with torch.no_grad():
        ours = reward_forward(model, **collate([{"prompt": [], "responses": seqs, "scores": [1, 0]}], PAD, "padded")[0])
        # Independent: each sequence alone, unpadded, scored at its final position.
        expected = [model.score(model.model(torch.tensor([s])).last_hidden_state[0, -1]).item() for s in seqs]
        # What "first pad token - 1" (the reference) would read for the first sequence: position 0.
        reference_bug = model.score(model.model(torch.tensor([seqs[0]])).last_hidden_state[0, 0]).item()
    assert ours.tolist() == pytest.approx(expected, abs=1e-6)
    assert abs(ours[0].item() - reference_bug) > 1e-4


def test_score_head_std_on_a_wide_head(tmp_path):
    hidden = 4096  # one narrow head (head_dim 8) keeps the model small while the score row is wide
    config = tiny_llama_config(
        64,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=8,
        pad_token_id=0,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    args = parse_args(["--model_name_or_path", str(tmp_path)])
    model = load_model(args, load_tokenizer(parse_args([])))
    w = model.score.weight.detach()
    expected = 1 / math.sqrt(hidden + 1)
    assert abs(w.std().item() / expected - 1) < 0.05
    assert abs(w.mean().item()) < 3 * expected / math.sqrt(hidden)
    again = load_model(args, load_tokenizer(parse_args([]))).score.weight.detach()
    assert torch.equal(w, again)  # seeded: every rank draws the same head


def test_init_score_head_false_keeps_the_loaded_head(tiny_model_dir):
    saved = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).score.weight
    args = parse_args(["--model_name_or_path", tiny_model_dir, "--init_score_head", "False"])
    model = load_model(args, load_tokenizer(args))
    assert torch.equal(model.score.weight, saved)


def test_no_active_dropout_anywhere(tmp_path):
    config = tiny_llama_config(64, attention_dropout=0.5, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    args = parse_args(["--model_name_or_path", str(tmp_path)])
    model = load_model(args, load_tokenizer(parse_args([]))).train()
    assert model.config.attention_dropout == 0.0
    for name, module in model.named_modules():
        assert not isinstance(module, nn.Dropout) or module.p == 0.0, name
        assert getattr(module, "attention_dropout", 0.0) == 0.0, name
    batch, _ = collate(random_rows(64, [(9, 14)]), 0, args.batching)
    torch.testing.assert_close(model(**batch), model(**batch), rtol=0, atol=0)  # deterministic in train mode


def test_toy_tokenizer_pad_is_added_and_embeddings_resized():
    args = parse_args([])
    tok = load_tokenizer(args)
    model = load_model(args, tok)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tok) and rows % 8 == 0
    assert len(tok) == len(toy.toy_tokenizer()) + 1 and model.config.pad_token_id == tok.pad_token_id
