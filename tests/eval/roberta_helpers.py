"""A tiny random RoBERTa with a byte-level BPE tokenizer trained on a few texts, saved to a folder
(BERTScore and the CT-RATE label classifier tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def tiny_roberta(path: Path, texts: Sequence[str], head: Any = None) -> Any:
    """Train the tokenizer on `texts`, save it and a random 3-layer RoBERTa config to `path`;
    returns (tokenizer, config). `head`: None saves a RobertaModel; a list of label names saves
    a RobertaForSequenceClassification whose id2label names them (multi-label)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts) * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(path))
    tok = RobertaTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=64)  # as roberta-large: 512
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    kw = {} if head is None else {"num_labels": len(head), "id2label": dict(enumerate(head)),
                                  "problem_type": "multi_label_classification"}
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=66, pad_token_id=tok.pad_token_id, **kw)
    (RobertaModel if head is None else RobertaForSequenceClassification)(cfg).eval().save_pretrained(str(path))
    return tok, cfg
