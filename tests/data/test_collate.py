"""Tests for medvlm3d.data.collate.Collator: text padding (right/left), slice padding, images."""

from __future__ import annotations

import pytest
import torch

from medvlm3d.data.collate import Collator
from medvlm3d.data.prompts import IGNORE_INDEX, encode_example, encode_prompt
from medvlm3d.data.tokenizer import train_tokenizer

PAD = 0
D, H, W, h, w = 4, 6, 6, 5, 5


def sample(sid: str, n_tok: int, n_prompt: int, n_slices: int, n_img: int = 1, n_q: int = 3) -> dict:
    ids = torch.arange(10, 10 + n_tok)
    labels = ids.clone()
    labels[:n_prompt] = IGNORE_INDEX
    s = n_slices
    return {
        "id": sid,
        "volume": torch.rand(n_img, 1, D, H, W) + 0.1,
        "slices": torch.rand(n_img, s, 1, h, w) + 0.1,
        "slice_plane": torch.ones(n_img, s, dtype=torch.long),
        "slice_index": torch.arange(s).repeat(n_img, 1),
        "slice_pos": ((torch.arange(s) + 0.5) / s).repeat(n_img, 1),
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones(n_tok, dtype=torch.long),
        "question_ids": list(range(50, 50 + n_q)),  # lists are accepted too
        "question": f"q {sid}",
        "target": f"t {sid}",
        "slice_target": torch.zeros(n_img, s).index_fill_(1, torch.tensor([1]), 1.0),
        "has_slice_target": torch.ones(n_img, dtype=torch.bool),
        "record": {"id": sid},
    }


def test_right_padding_and_slices() -> None:
    a, b = sample("a", 6, 4, 5, n_q=2), sample("b", 9, 5, 8, n_q=4)
    batch = Collator(PAD)([a, b])
    assert batch["input_ids"].shape == (2, 9) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, :6].tolist() == a["input_ids"].tolist()
    assert batch["input_ids"][0, 6:].tolist() == [PAD] * 3
    assert batch["attention_mask"].tolist()[0] == [1] * 6 + [0] * 3
    assert batch["labels"][0, 6:].tolist() == [IGNORE_INDEX] * 3
    assert torch.equal(batch["labels"][1], b["labels"])
    assert batch["question_ids"].shape == (2, 4)
    assert batch["question_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    # slices: S_max = 8, zero padded, masked
    assert batch["slices"].shape == (2, 8, 1, h, w)
    assert batch["slice_mask"].sum(1).tolist() == [5, 8]
    assert torch.equal(batch["slices"][0, :5], a["slices"][0])
    assert batch["slices"][0, 5:].abs().sum() == 0
    for key in ("slice_plane", "slice_index", "slice_pos", "slice_series", "slice_target"):
        assert batch[key].shape == (2, 8)
        assert batch[key][0, 5:].abs().sum() == 0
    assert batch["slice_pos"].dtype == torch.float32 and batch["slice_plane"].dtype == torch.long
    assert batch["slice_target"][:, 1].tolist() == [1.0, 1.0]
    assert batch["has_slice_target"].tolist() == [True, True]
    assert batch["volumes"].shape == (2, 1, D, H, W)
    assert batch["image_to_sample"].tolist() == [0, 1]
    assert batch["ids"] == ["a", "b"] and batch["questions"] == ["q a", "q b"] and batch["targets"] == ["t a", "t b"]
    assert batch["records"] == [{"id": "a"}, {"id": "b"}]


def test_left_padding() -> None:
    a, b = sample("a", 6, 4, 5), sample("b", 9, 5, 8)
    batch = Collator(PAD, padding_side="left")([a, b])
    assert batch["input_ids"][0, :3].tolist() == [PAD] * 3
    assert batch["input_ids"][0, 3:].tolist() == a["input_ids"].tolist()
    assert batch["attention_mask"][0].tolist() == [0] * 3 + [1] * 6
    assert batch["labels"][0, :3].tolist() == [IGNORE_INDEX] * 3
    # slices and the question are never left-padded
    assert batch["slice_mask"][0].tolist() == [True] * 5 + [False] * 3
    assert batch["question_mask"][0].tolist() == [1, 1, 1]


def test_multiple_images_per_sample() -> None:
    a, b, c = sample("a", 5, 3, 4, n_img=2), sample("b", 5, 3, 6, n_img=1), sample("c", 4, 2, 3, n_img=3)
    batch = Collator(PAD)([a, b, c])
    assert batch["volumes"].shape == (6, 1, D, H, W)
    assert batch["image_to_sample"].tolist() == [0, 0, 1, 2, 2, 2]
    assert torch.equal(batch["volumes"][2], b["volume"][0])
    assert torch.equal(batch["volumes"][3], c["volume"][0])
    assert torch.equal(batch["slices"][2], b["slices"][0])
    assert batch["slices"].shape == (6, 6, 1, h, w)
    assert batch["slice_mask"].sum(1).tolist() == [4, 4, 6, 3, 3, 3]
    assert batch["has_slice_target"].shape == (6,)
    assert batch["input_ids"].shape == (3, 5)


def test_bad_batches() -> None:
    with pytest.raises(ValueError, match="padding_side"):
        Collator(PAD, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id"):
        Collator(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        Collator(PAD)([])
    a, b = sample("a", 5, 3, 4), sample("b", 5, 3, 4)
    b["volume"] = torch.rand(1, 1, D + 2, H, W)
    with pytest.raises(ValueError, match="'a'.*'b'.*data.size"):
        Collator(PAD)([a, b])
    c = sample("c", 5, 3, 4)
    c["labels"] = c["labels"][:-1]
    with pytest.raises(ValueError, match="'c'.*lengths differ"):
        Collator(PAD)([c])
    d = sample("d", 5, 3, 4)
    d["slice_pos"] = d["slice_pos"][:, :3]
    with pytest.raises(ValueError, match="'d'.*slice_pos"):
        Collator(PAD)([d])


def test_left_padded_prompts_end_together(tmp_path) -> None:
    """Batched generation: with left padding every prompt ends at the last column."""
    tok = train_tokenizer(["Where is the nodule?", "Which organ?", "A. liver B. spleen"] * 4, tmp_path, 300)
    short = encode_prompt(tok, "Which organ?", 3)
    long = encode_prompt(tok, "Where is the nodule? Choices: A. liver B. spleen", 3)
    ex = encode_example(tok, "Which organ?", "A. liver", 3)
    samples = []
    for sid, ids in (("s", short), ("l", long)):
        s = sample(sid, len(ids), len(ids), 4)
        s["input_ids"], s["labels"], s["attention_mask"] = ids, [IGNORE_INDEX] * len(ids), [1] * len(ids)
        samples.append(s)
    batch = Collator(tok.pad_token_id, "left")(samples)
    assert batch["input_ids"][0, -len(short):].tolist() == short
    assert batch["input_ids"][1].tolist() == long
    assert batch["attention_mask"][0].sum() == len(short)
    assert ex["input_ids"][: len(short)] == short


def test_slices_that_are_the_volume_stay_one_tensor() -> None:
    """Slices given as the volume's axial view (data/shards.py: axial_view) come out as a view of
    the batch's volumes, equal to what the padding path makes of a copy of them."""
    from medvlm3d.data.shards import axial_view

    a, b = sample("a", 6, 4, D), sample("b", 7, 4, D)
    for s in (a, b):
        s["slices"] = axial_view(s["volume"])
    batch = Collator(PAD)([a, b])
    assert batch["slices"].data_ptr() == batch["volumes"].data_ptr()
    copies = [{**s, "slices": s["slices"].clone()} for s in (a, b)]
    ref = Collator(PAD)(copies)
    assert ref["slices"].data_ptr() != ref["volumes"].data_ptr()
    assert torch.equal(batch["slices"], ref["slices"]) and batch["slices"].shape == (2, D, 1, H, W)
    assert torch.equal(batch["volumes"], ref["volumes"])
