"""M3D-CLIP's text tower -> an HF BERT folder (`medvlm3d convert --extract-text-tower`), issue 18.

A synthetic M3D-CLIP checkpoint with M3D's layout (`vision_encoder.*`, `language_encoder.*` =
BertModel keys, `mm_{vision,language}_proj.*`, `logit_scale`) at small width; the real
bert-base shapes are checked on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, BertTokenizer

from medvlm3d.cli import main
from medvlm3d.data.errors import DataError
from medvlm3d.model.clip_text import bert_config_from_shapes, check_against_bert, extract_m3d_clip_text_tower
from medvlm3d.model.llm import TextEncoder

SMALL = dict(vocab_size=31, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=40)
TEXTS = ["a liver lesion", "no finding", "cyst"]


def m3d_clip_state(bert: BertModel) -> dict[str, torch.Tensor]:
    """M3D-CLIP's top-level layout around `bert` (the vision part only needs its names here)."""
    h = bert.config.hidden_size
    sd = {f"language_encoder.{k}": v.clone() for k, v in bert.state_dict().items()}
    sd |= {"vision_encoder.cls_token": torch.zeros(1, 1, h), "vision_encoder.norm.weight": torch.ones(h),
           "mm_vision_proj.weight": torch.eye(h), "mm_vision_proj.bias": torch.zeros(h),
           "mm_language_proj.weight": torch.eye(h), "mm_language_proj.bias": torch.zeros(h),
           "logit_scale": torch.tensor(2.659)}
    return sd


@pytest.fixture()
def bert_tok(tmp_path: Path) -> Path:
    tok = tmp_path / "bert-base-uncased"
    tok.mkdir()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters]) + "\n")
    BertTokenizer(str(tok / "vocab.txt")).save_pretrained(tok)
    return tok


@pytest.fixture()
def bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(**SMALL)).eval()


def test_extracted_folder_gives_the_pooler_output_of_the_bert_inside(tmp_path, bert, bert_tok):
    ckpt = tmp_path / "m3d_clip" / "model.safetensors"
    ckpt.parent.mkdir()
    save_file({k: v.contiguous() for k, v in m3d_clip_state(bert).items()}, str(ckpt))
    assert main(["convert", "--extract-text-tower", str(ckpt), str(tmp_path / "text"),
                 "--tokenizer", str(bert_tok), "--num-heads", "2"]) == 0
    out = tmp_path / "text"
    assert load_file(str(out / "model.safetensors")).keys() == bert.state_dict().keys()
    enc = TextEncoder(str(out), out_pooling="pooler")
    assert enc.encoder.config.num_attention_heads == 2 and enc.out_dim == 16
    by_hand = BertModel(BertConfig(**SMALL)).eval()  # the same weights loaded by hand, outside TextEncoder
    by_hand.load_state_dict({k[len("language_encoder."):]: v for k, v in load_file(str(ckpt)).items()
                             if k.startswith("language_encoder.")})
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = by_hand(**batch).pooler_output
    got = enc(TEXTS)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, TextEncoder(str(out), out_pooling="cls")(TEXTS))


def test_a_torch_bin_with_old_position_ids_and_no_tokenizer(tmp_path, bert, bert_tok, capsys):
    sd = m3d_clip_state(bert)
    sd["language_encoder.embeddings.position_ids"] = torch.arange(40).unsqueeze(0)  # transformers < 4.31
    ckpt = tmp_path / "pytorch_model.bin"
    torch.save(sd, ckpt)
    assert main(["convert", "--extract-text-tower", str(ckpt), str(tmp_path / "text"), "--num-heads", "2"]) == 0
    assert "note: no tokenizer given: copy bert-base-uncased's tokenizer files" in capsys.readouterr().out
    assert "embeddings.position_ids" not in load_file(str(tmp_path / "text" / "model.safetensors"))
    for f in bert_tok.iterdir():  # the user copies the tokenizer files in
        (tmp_path / "text" / f.name).write_bytes(f.read_bytes())
    torch.testing.assert_close(TextEncoder(str(tmp_path / "text"), out_pooling="pooler")(TEXTS)[0],
                               bert(**BertTokenizer(str(bert_tok / "vocab.txt"))(TEXTS[:1], return_tensors="pt"))
                               .pooler_output[0].detach())
    sd["language_encoder.embeddings.position_ids"] = torch.arange(1, 41).unsqueeze(0)
    torch.save(sd, ckpt)
    with pytest.raises(DataError, match="position_ids is not 0..39"):
        extract_m3d_clip_text_tower(ckpt, tmp_path / "text2", num_heads=2)


def test_every_key_consumed_none_missing(tmp_path, bert, bert_tok):
    ckpt = tmp_path / "model.safetensors"

    def attempt(sd: dict[str, torch.Tensor], name: str) -> None:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
        extract_m3d_clip_text_tower(ckpt, tmp_path / name, bert_tok, num_heads=2)

    sd = m3d_clip_state(bert)
    del sd["language_encoder.pooler.dense.weight"]
    with pytest.raises(DataError, match=r"missing \['language_encoder\.pooler\.dense\.weight'\], unexpected \[\]"):
        attempt(sd, "a")
    sd = m3d_clip_state(bert) | {"language_encoder.encoder.layer.0.extra.weight": torch.zeros(2)}
    with pytest.raises(DataError, match=r"unexpected \['language_encoder\.encoder\.layer\.0\.extra\.weight'\]"):
        attempt(sd, "b")
    sd = m3d_clip_state(bert) | {"language_encoder.pooler.dense.bias": torch.zeros(8)}
    with pytest.raises(DataError, match=r"mismatched \['pooler\.dense\.bias: file \(8,\) vs BERT \(16,\)'\]"):
        attempt(sd, "c")
    sd = m3d_clip_state(bert) | {"text_proj.weight": torch.zeros(2)}
    with pytest.raises(DataError, match=r"belong to no part of M3D-CLIP .*\['text_proj\.weight'\]"):
        attempt(sd, "d")
    with pytest.raises(DataError, match="no 'language_encoder.\\*' key"):
        attempt({"vision_encoder.norm.weight": torch.ones(4)}, "e")
    with pytest.raises(DataError, match="cannot tell the attention heads of width 16"):
        save_file({k: v.contiguous() for k, v in m3d_clip_state(bert).items()}, str(ckpt))
        extract_m3d_clip_text_tower(ckpt, tmp_path / "f")
    assert not any((tmp_path / n).exists() for n in "abcdef")  # nothing half written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["convert", "--extract-text-tower", str(ckpt), str(tmp_path / "full"), "--num-heads", "2"]) == 2
    assert [f.name for f in (tmp_path / "full").iterdir()] == ["x"]
    assert main(["convert", str(ckpt), str(tmp_path / "w.safetensors"), "--num-heads", "2"]) == 2  # needs the flag


def test_tokenizer_folder_config_json_supplies_the_heads_and_must_fit(tmp_path, bert, bert_tok):
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m3d_clip_state(bert).items()}, str(ckpt))
    BertConfig(**SMALL).to_json_file(str(bert_tok / "config.json"))
    out, notes = extract_m3d_clip_text_tower(ckpt, tmp_path / "text", bert_tok)
    assert notes == [] and TextEncoder(str(out)).encoder.config.num_attention_heads == 2
    BertConfig(**(SMALL | {"intermediate_size": 64})).to_json_file(str(bert_tok / "config.json"))
    with pytest.raises(DataError, match="intermediate_size: config.json 64 vs weights 32"):
        extract_m3d_clip_text_tower(ckpt, tmp_path / "text2", bert_tok)


def test_real_bert_base_layout_of_m3d_clip_on_meta():
    """bert-base-uncased (M3D-CLIP's language_model_name_or_path): the shapes alone give its config."""
    with torch.device("meta"):
        base = BertModel(BertConfig())
    text = dict(base.state_dict())
    text["embeddings.position_ids"] = torch.arange(512).unsqueeze(0)  # as an older transformers saved it
    cfg = bert_config_from_shapes(text, Path("pytorch_model.bin"))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.max_position_embeddings, cfg.type_vocab_size) == (30522, 768, 12, 12, 3072,
                                                                                          512, 2)
    kept = check_against_bert(text, cfg, Path("pytorch_model.bin"))
    assert len(kept) == len(base.state_dict()) and "embeddings.position_ids" not in kept
    assert tuple(kept["pooler.dense.weight"].shape) == (768, 768)
