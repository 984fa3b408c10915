"""M3D-CLIP's text tower (its `language_encoder`, a BERT-base) -> a plain HF BERT folder, once.

    extract_m3d_clip_text_tower(src, out_dir, tokenizer_dir=None, num_heads=None) -> (out_dir, notes)
        src            the released M3D-CLIP weights (`model.safetensors`, or `pytorch_model.bin`
                       read with weights_only=True through `encoder3d.read_state_dict`)
        out_dir        a new (or empty) folder; gets config.json + model.safetensors (+ tokenizer)
        tokenizer_dir  a local bert-base-uncased copy: its tokenizer files are copied in and its
                       config.json (if any) supplies the fields that shapes cannot tell
                       (num_attention_heads, hidden_act, layer_norm_eps)
        num_heads      attention heads when no config.json says it (default hidden // 64: 12)

M3D-CLIP (BAAI-DCAI/M3D, LaMed/src/model/CLIP.py) holds `vision_encoder.*` (the 3D ViT, loaded by
`encoder3d.weights_key_map=m3d_clip`), `language_encoder.*` (a `BertModel` from
bert-base-uncased: embeddings [30522, 768] / [512, 768] / [2, 768], 12 layers of width 768 and
3072, pooler [768, 768]), `mm_vision_proj.*`, `mm_language_proj.*` and `logit_scale`. The
`language_encoder.` tensors, renamed to BertModel's own keys, are the whole BERT: every one of
BertModel's keys must be there with BertModel's shape and every `language_encoder.` key must be
one of them (an older transformers' `embeddings.position_ids` buffer is checked to be
arange(max_positions) and dropped); anything else is a DataError listing the keys. The BERT
config is read from the shapes (vocab, width, positions, token types, layers, MLP width).
Med-2E3's TG-IS then reads this folder's `pooler_output` (`model.tgis.text_encoder: out_dir`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from medvlm3d.data.errors import DataError
from medvlm3d.io import atomic_dir
from medvlm3d.model.encoder3d import read_state_dict

TEXT_PREFIX = "language_encoder."
OTHER_PREFIXES = ("vision_encoder.", "mm_vision_proj.", "mm_language_proj.", "logit_scale")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
NO_TOKENIZER_NOTE = ("no tokenizer given: copy bert-base-uncased's tokenizer files (vocab.txt, "
                     "tokenizer_config.json, special_tokens_map.json, tokenizer.json) into {out} "
                     "before pointing model.tgis.text_encoder at it")
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "max_position_embeddings", "type_vocab_size",
                 "num_hidden_layers", "intermediate_size")


def split_text_tower(sd: dict[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    """The `language_encoder.*` tensors of an M3D-CLIP state dict, prefix stripped; a key that is
    neither text tower nor a known M3D-CLIP part is a DataError listing it."""
    text = {k[len(TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    if not text:
        raise DataError(f"{src}: no '{TEXT_PREFIX}*' key, so not an M3D-CLIP checkpoint "
                        f"(keys start with {sorted(sd)[:5]})")
    stray = sorted(k for k in sd if not k.startswith((TEXT_PREFIX, *OTHER_PREFIXES)))
    if stray:
        raise DataError(f"{src}: {len(stray)} keys belong to no part of M3D-CLIP (expected "
                        f"{TEXT_PREFIX}* or {', '.join(OTHER_PREFIXES)}): {stray[:20]}")
    return text


def bert_config_from_shapes(text: dict[str, torch.Tensor], src: Path, base: dict | None = None,
                            num_heads: int | None = None):
    """A BertConfig whose shape fields come from the tensors; `base` (a config.json dict) gives
    the rest and must agree with the shapes on the fields it states."""
    from transformers import BertConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in text:
            raise DataError(f"{src}: the text tower lacks {TEXT_PREFIX}{key}, needed to read its size")
        return tuple(text[key].shape)

    vocab, width = shape("embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in text if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    found = dict(vocab_size=vocab, hidden_size=width,
                 max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
                 type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
                 num_hidden_layers=max(layers) + 1 if layers else 0,
                 intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0])
    base = dict(base or {})
    clash = [f"{f}: config.json {base[f]} vs weights {found[f]}" for f in _SHAPE_FIELDS
             if f in base and base[f] != found[f]]
    if clash:
        raise DataError(f"{src}: the tokenizer folder's config.json does not fit the weights: {'; '.join(clash)}")
    heads = num_heads or base.get("num_attention_heads") or (width // 64 if width % 64 == 0 else 0)
    if heads < 1 or width % heads:
        raise DataError(f"{src}: cannot tell the attention heads of width {width}; pass num_heads "
                        f"(a divisor of {width}) or a tokenizer folder with bert's config.json")
    base.pop("architectures", None)
    base.update(found, num_attention_heads=int(heads), model_type="bert")
    return BertConfig.from_dict(base)


def check_against_bert(text: dict[str, torch.Tensor], config, src: Path) -> dict[str, torch.Tensor]:
    """`text` restricted to BertModel(config)'s keys; any missing, extra or misshapen key is a
    DataError listing them (a persistent `embeddings.position_ids` must be arange and is dropped)."""
    from transformers import BertModel

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in BertModel(config).state_dict().items()}
    text = dict(text)
    pos = text.get("embeddings.position_ids")
    if pos is not None and "embeddings.position_ids" not in want:
        if not torch.equal(pos.reshape(-1).long(), torch.arange(config.max_position_embeddings)):
            raise DataError(f"{src}: {TEXT_PREFIX}embeddings.position_ids is not 0..{config.max_position_embeddings - 1}")
        del text["embeddings.position_ids"]
    missing = sorted(k for k in want if k not in text)
    extra = sorted(k for k in text if k not in want)
    bad = [f"{k}: file {tuple(text[k].shape)} vs BERT {want[k]}" for k in sorted(want) if k in text
           and tuple(text[k].shape) != want[k]]
    if missing or extra or bad:
        raise DataError(f"{src}: the {TEXT_PREFIX}* tensors are not a BertModel ({config.num_hidden_layers} "
                        f"layers, width {config.hidden_size}): missing {[TEXT_PREFIX + k for k in missing][:20]}, "
                        f"unexpected {[TEXT_PREFIX + k for k in extra][:20]}, mismatched {bad[:10]}")
    return text


def copy_tokenizer(tokenizer_dir: Path, out: Path, vocab_size: int) -> list[str]:
    """Copy the tokenizer files of `tokenizer_dir` into `out`; returns their names."""
    names = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    if not ({"vocab.txt", "tokenizer.json"} & set(names)):
        raise DataError(f"{tokenizer_dir}: no vocab.txt or tokenizer.json (expected a local bert-base-uncased copy)")
    if "vocab.txt" in names:
        with open(tokenizer_dir / "vocab.txt", encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > vocab_size:
            raise DataError(f"{tokenizer_dir / 'vocab.txt'}: {n} tokens, the text tower embeds only {vocab_size}")
    for name in names:
        shutil.copyfile(tokenizer_dir / name, out / name)
    return names


def extract_m3d_clip_text_tower(src: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                                tokenizer_dir: str | os.PathLike[str] | None = None,
                                num_heads: int | None = None) -> tuple[Path, list[str]]:
    """Write M3D-CLIP's BERT as an HF folder at `out_dir`; returns (out_dir, notes for the user)."""
    import json

    from safetensors.torch import save_file

    source, out = Path(src), Path(out_dir)
    if not source.is_file():
        raise DataError(f"{source}: no such weights file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: the output must be a new or empty folder")
    tok = Path(tokenizer_dir) if tokenizer_dir else None
    if tok is not None and not tok.is_dir():
        raise DataError(f"{tok}: no such tokenizer folder")
    base = None
    if tok is not None and (tok / "config.json").is_file():
        try:
            base = json.loads((tok / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{tok / 'config.json'}: not readable JSON ({e})") from e
    try:
        sd = read_state_dict(source, "M3D-CLIP weights")
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from e
    text = split_text_tower(sd, source)
    config = bert_config_from_shapes(text, source, base, num_heads)
    text = check_against_bert(text, config, source)
    notes = []
    with atomic_dir(out) as tmp:
        config.architectures = ["BertModel"]
        config.to_json_file(str(tmp / "config.json"))
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in text.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "converted_from": source.name})
        if tok is not None:
            copy_tokenizer(tok, tmp, config.vocab_size)
        else:
            notes.append(NO_TOKENIZER_NOTE.format(out=out))
    return out, notes


__all__ = ["extract_m3d_clip_text_tower", "split_text_tower", "bert_config_from_shapes", "check_against_bert"]
