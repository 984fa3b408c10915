"""Tests for medvlm3d.data.prompts: formats, chat/plain templates, image expansion, labels."""

from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from medvlm3d.data.errors import DataError
from medvlm3d.data.prompts import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    encode_example,
    encode_prompt,
    format_record,
    image_token_id,
)
from medvlm3d.data.tokenizer import train_tokenizer

TEXTS = [
    f"{q} Choices: A. {a} B. {b} C. kidney D. lung"
    for q in ("Which organ shows the lesion?", "Where is the nodule?", "What plane is this image?")
    for a, b in (("liver", "spleen"), ("axial", "coronal"), ("left lobe", "right lobe"))
] + [
    f"The {organ} shows a {size} hypodense lesion of {mm} mm. No other findings."
    for organ in ("liver", "spleen", "left kidney", "right lung")
    for size, mm in (("small", 8), ("large", 35), ("round", 12))
]

VQA = {
    "id": "q1",
    "image": "/x.npy",
    "task": "vqa",
    "question": "Which organ shows the lesion?",
    "answer": "spleen",
    "choices": ["liver", "spleen", "kidney", "lung"],
    "answer_choice": "B",
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def plain_tok(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


# ---------------------------------------------------------------------------- format_record


def test_closed_format_exact() -> None:
    q, t = format_record(VQA)
    assert q == "Which organ shows the lesion? Choices: A. liver B. spleen C. kidney D. lung"
    assert t == "B. spleen"
    assert format_record(VQA, "vqa") == (q, t)
    assert format_record(VQA, "vqa_closed") == (q, t)


def test_closed_letter_from_answer_when_missing() -> None:
    rec = {**VQA, "answer_choice": None, "answer": "lung"}
    assert format_record(rec)[1] == "D. lung"


def test_open_format() -> None:
    assert format_record(VQA, "vqa_open") == ("Which organ shows the lesion?", "spleen")
    no_choices = {k: v for k, v in VQA.items() if k not in ("choices", "answer_choice")}
    assert format_record(no_choices) == ("Which organ shows the lesion?", "spleen")
    report = {"id": "r", "task": "report", "question": "Describe the findings.", "answer": "Normal liver."}
    assert format_record(report) == ("Describe the findings.", "Normal liver.")


def test_format_errors_name_the_record() -> None:
    no_choices = {k: v for k, v in VQA.items() if k != "choices"}
    with pytest.raises(DataError, match="'q1'.*choices"):
        format_record(no_choices, "vqa_closed")
    with pytest.raises(DataError, match="'q1'.*answer"):
        format_record({**VQA, "answer": ""})
    with pytest.raises(DataError, match="'q1'.*answer_choice"):
        format_record({**VQA, "answer_choice": "E"})
    with pytest.raises(DataError, match="'q1'"):
        format_record({**VQA, "answer_choice": "", "answer": "pancreas"})
    with pytest.raises(ValueError, match="task must be one of"):
        format_record(VQA, "caption")


# ---------------------------------------------------------------------------- encoding


def test_image_tokens_expanded(tok: PreTrainedTokenizerFast) -> None:
    img = image_token_id(tok)
    for n_images, n_tok in ((1, 7), (3, 5)):
        ids = encode_prompt(tok, "Where is the nodule?", n_tok, n_images=n_images)
        assert ids.count(img) == n_images * n_tok
        # each image is one contiguous run of n_tok ids
        runs = [i for i in range(len(ids)) if ids[i] == img and (i == 0 or ids[i - 1] != img)]
        assert len(runs) == n_images
        assert all(ids[r : r + n_tok] == [img] * n_tok for r in runs)


def test_chat_prompt_text(tok: PreTrainedTokenizerFast) -> None:
    ids = encode_prompt(tok, "Where is the nodule?", 2, n_images=2)
    assert tok.decode(ids) == "<s>user: " + ("<image>" * 2 + "\n") * 2 + "Where is the nodule?\nassistant: "


def test_plain_template_path(plain_tok: PreTrainedTokenizerFast, tok: PreTrainedTokenizerFast) -> None:
    ids = encode_prompt(plain_tok, "Where is the nodule?", 3)
    assert plain_tok.decode(ids) == "<s>USER: " + "<image>" * 3 + "\nWhere is the nodule?\nASSISTANT: "
    assert ids != encode_prompt(tok, "Where is the nodule?", 3)
    ex = encode_example(plain_tok, "Where is the nodule?", "B. spleen", 3)
    assert ex["input_ids"][: len(ids)] == ids


@pytest.mark.parametrize("which", ["chat", "plain"])
def test_labels_supervise_only_target_and_eos(which: str, tok, plain_tok) -> None:
    t = tok if which == "chat" else plain_tok
    q, target = format_record(VQA)
    ex = encode_example(t, q, target, num_image_tokens=4, n_images=2)
    prompt = encode_prompt(t, q, 4, n_images=2)
    n = len(prompt)
    assert ex["input_ids"][:n] == prompt  # train and generation prompts are identical
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    sup = ex["labels"][n:]
    assert IGNORE_INDEX not in sup and sup == ex["input_ids"][n:]
    assert sup[-1] == t.eos_token_id
    assert sup[:-1] == t(target, add_special_tokens=False)["input_ids"]
    assert t.decode(sup, skip_special_tokens=True) == "B. spleen"


def test_truncation_cuts_target_only(tok: PreTrainedTokenizerFast) -> None:
    target = "The liver shows a large hypodense lesion of 35 mm. No other findings. " * 4
    prompt = encode_prompt(tok, "Describe.", 8)
    full = encode_example(tok, "Describe.", target, 8, max_len=10_000)
    max_len = len(prompt) + 5
    ex = encode_example(tok, "Describe.", target, 8, max_len=max_len)
    assert len(ex["input_ids"]) == max_len
    assert ex["input_ids"] == full["input_ids"][:max_len]  # prompt intact, target cut at its end
    assert ex["input_ids"].count(image_token_id(tok)) == 8
    assert ex["labels"][-1] != tok.eos_token_id  # a cut answer does not end with eos
    assert sum(x != IGNORE_INDEX for x in ex["labels"]) == 5


def test_truncation_error_names_record(tok: PreTrainedTokenizerFast) -> None:
    prompt = encode_prompt(tok, "Describe.", 8)
    with pytest.raises(DataError, match="'case-7'.*max_len"):
        encode_example(tok, "Describe.", "Normal.", 8, max_len=len(prompt) + 1, record_id="case-7")


def test_encode_errors(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match="'r1'.*must not contain"):
        encode_example(tok, f"Look at {IMAGE_TOKEN} here", "A. liver", 2, record_id="r1")
    with pytest.raises(DataError, match="target"):
        encode_example(tok, "Where?", "  ", 2)
    with pytest.raises(ValueError, match="num_image_tokens"):
        encode_prompt(tok, "Where?", 0)
    with pytest.raises(ValueError, match="n_images"):
        encode_prompt(tok, "Where?", 2, n_images=-1)


def test_image_token_missing() -> None:
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    t = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="no '<image>' token"):
        image_token_id(t)
    with pytest.raises(ValueError, match="<image>"):
        encode_prompt(t, "a", 2)


def test_shuffle_choices_moves_the_letter_with_its_answer_and_varies_the_order() -> None:
    import torch

    from medvlm3d.data.prompts import shuffle_choices

    rec = {"id": "r", "task": "vqa", "question": "Side?", "answer": "left",
           "choices": ["right", "left", "midline", "both sides"], "answer_choice": "B"}
    torch.manual_seed(0)
    letters, orders = set(), set()
    for _ in range(40):
        new = shuffle_choices(rec)
        question, target = format_record(new)
        letter = target.split(".")[0]
        assert target == f"{letter}. left" and f"{letter}. left" in question
        assert sorted(new["choices"]) == sorted(rec["choices"])
        letters.add(letter)
        orders.add(tuple(new["choices"]))
    assert letters == {"A", "B", "C", "D"} and len(orders) > 10
    assert rec["choices"][1] == "left" and rec["answer_choice"] == "B"  # the input is not changed
    assert shuffle_choices({**rec, "choices": []}) == {**rec, "choices": []}
    with pytest.raises(DataError, match="answer_choice"):
        shuffle_choices({**rec, "answer_choice": "F"})
