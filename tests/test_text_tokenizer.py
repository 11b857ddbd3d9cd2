"""Tokenizers: the byte-level default and a `tokenizers` JSON file given by path (made here, never fetched)."""

from __future__ import annotations

import pytest
import torch

from mmt.text import ByteTokenizer, JsonTokenizer, build_tokenizer


def test_byte_tokenizer_round_trip_and_truncation():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len("héllo".encode()) + 2
    assert tok.decode(ids) == "héllo"
    short = tok.encode("a long caption", max_len=5)
    assert len(short) == 5 and short[-1] == tok.eos_id
    assert max(tok.encode("\xff" * 3)) < tok.vocab_size


@pytest.fixture()
def json_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(["a photo of a cat", "a photo of a dog", "a drawing of a seven"], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_json_tokenizer_from_path(json_tokenizer):
    tok = build_tokenizer(str(json_tokenizer))
    assert isinstance(tok, JsonTokenizer)
    ids = tok.encode("a photo of a dog")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 7
    assert tok.decode(ids) == "a photo of a dog"
    assert tok.pad_id == 0


def test_text_tower_with_json_tokenizer(json_tokenizer):
    from mmt.config.model import MultiModalConfig, TextEncoderConfig
    from mmt.model.factory import create_model

    tok = JsonTokenizer(json_tokenizer)
    cfg = MultiModalConfig(
        dim=32,
        depth=1,
        num_heads=4,
        text=TextEncoderConfig(tokenizer=str(json_tokenizer), vocab_size=tok.vocab_size),
    )
    model = create_model(cfg)
    ids = torch.tensor([tok.encode("a photo of a cat")])
    out = model(text_inputs=ids, text_attention_mask=torch.ones_like(ids, dtype=torch.bool))
    assert out.embeddings["text"].shape == (1, 64)


def test_vocab_size_smaller_than_tokenizer_is_refused(json_tokenizer):
    from mmt.config.model import MultiModalConfig, TextEncoderConfig
    from mmt.model.factory import create_model

    cfg = MultiModalConfig(
        dim=32, depth=1, num_heads=4, text=TextEncoderConfig(tokenizer="byte", vocab_size=100)
    )
    with pytest.raises(ValueError, match="model.text.vocab_size=100"):
        create_model(cfg)


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_tokenizer(str(tmp_path / "nope.json"))
