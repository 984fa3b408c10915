"""Tests for medvlm3d.data.tokenizer.train_tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from medvlm3d.data.prompts import IMAGE_TOKEN
from medvlm3d.data.tokenizer import CHAT_TEMPLATE, train_tokenizer

TEXTS = [
    f"{q} Choices: A. {a} B. {b} C. kidney D. lung"
    for q in ("Which organ shows the lesion?", "Where is the nodule?", "What plane is this image?")
    for a, b in (("Liver", "spleen"), ("axial", "coronal"), ("left lobe", "right lobe"))
] + [
    f"The {organ} shows a {size} hypodense lesion of {mm} mm. No other findings."
    for organ in ("liver", "spleen", "left kidney", "right lung")
    for size, mm in (("small", 8), ("large", 35), ("round", 12))
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_special_tokens(tok: PreTrainedTokenizerFast) -> None:
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert img == 4
    assert tok("x <image> y", add_special_tokens=False)["input_ids"].count(img) == 1
    assert IMAGE_TOKEN in tok.extra_special_tokens
    assert len(tok) <= 400


def test_keeps_case_and_round_trips(tok: PreTrainedTokenizerFast) -> None:
    assert tok("A. Liver", add_special_tokens=False)["input_ids"] != tok("a. liver", add_special_tokens=False)["input_ids"]
    for text in ("B. spleen", "A. Liver", "Größe 3 mm → Ödem", "  two  spaces\nnewline"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
        assert tok.decode(ids) == text


def test_chat_template_renders_turns(tok: PreTrainedTokenizerFast) -> None:
    assert tok.chat_template == CHAT_TEMPLATE
    user = {"role": "user", "content": "<image>\nWhere?"}
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user: <image>\nWhere?\nassistant: "
    full = tok.apply_chat_template([user, {"role": "assistant", "content": "B. spleen"}], tokenize=False)
    assert full == "<s>user: <image>\nWhere?\nassistant: B. spleen</s>"


def test_deterministic_and_reloads(tok: PreTrainedTokenizerFast, tmp_path) -> None:
    again = train_tokenizer(TEXTS, tmp_path / "a", vocab_size=400)
    train_tokenizer(TEXTS, tmp_path / "b", vocab_size=400)
    assert again.get_vocab() == tok.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    text = "<s>user: <image>\nWhich organ?\nassistant: A. Liver</s>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == 4
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="text #1 must be a str"):
        train_tokenizer(["ok", 3], tmp_path)
