"""CT-RATE's report label classifier, read from a local folder, for the `ctrate_ce` protocol.

    classifier_labels(folder, texts [N], device="cpu", batch_size=16) -> [N] {label: 0/1}
        over the 18 CT_RATE_LABELS (in that order)
    ct_clip_state_to_hf(state) -> the same tensors under RobertaForSequenceClassification names

Reference: CT-CLIP's `text_classifier` (the model behind CT-RATE's `*_predicted_labels.csv`):
RadBERT-RoBERTa-4m with `nn.Linear(hidden, n_labels)` on the pooler output (classifier.py);
reports tokenised to at most 512 tokens; a label is 1 when `expit(logit) >= 0.5`
(model_trainer.py `infer`, threshold 0.5). Scores are then sklearn's precision / recall / F1,
micro and macro over labels (model_trainer.py's `f1_score(average=...)`; eval/metrics/classify.py
`findings_prf`).

The folder holds a transformers sequence classifier (AutoModelForSequenceClassification) and its
tokenizer, `config.id2label` naming the CT-RATE labels (extra labels, e.g. CT-CLIP's "Tree in
bud", are ignored). In eval mode RobertaForSequenceClassification's head (dense, tanh, out_proj
on the <s> token) computes exactly RobertaPooler (dense, tanh on the first token) + Linear, so
CT-CLIP's weights map one to one (`ct_clip_state_to_hf`): model.pooler.dense.* ->
classifier.dense.*, classifier.* -> classifier.out_proj.*, model.* -> roberta.*. Nothing is
unpickled here: convert a `.pth` to safetensors yourself, map it, `save_pretrained` the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from medvlm3d.data.errors import ConfigError
from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS

THRESHOLD = 0.5  # CT-CLIP model_trainer.py: expit(logits) >= threshold
MAX_LENGTH = 512  # CT-CLIP dataset.py: max_length 512, truncation


def ct_clip_state_to_hf(state: Mapping[str, Any]) -> dict[str, Any]:
    """CT-CLIP RadBertClassifier parameter names -> RobertaForSequenceClassification names."""
    out = {}
    for name, value in state.items():
        if name.startswith("model.pooler.dense."):
            out["classifier.dense." + name[len("model.pooler.dense."):]] = value
        elif name.startswith("classifier."):
            out["classifier.out_proj." + name[len("classifier."):]] = value
        elif name.startswith("model."):
            out["roberta." + name[len("model."):]] = value
        else:
            raise ConfigError(f"CT-CLIP classifier state: unexpected parameter {name!r} "
                              "(expected model.* and classifier.*)")
    return out


def classifier_labels(folder: str | Path, texts: Sequence[str], device: str = "cpu",
                      batch_size: int = 16) -> list[dict[str, int]]:
    """The 18 CT-RATE labels (0/1) of each text, read by the classifier in `folder`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"ctrate_classifier {str(folder)!r}: expected a folder with config.json, the weights and "
                          "a tokenizer (a transformers sequence classifier); docs/metrics.md says how to make one")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).to(device).eval()
    names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    missing = [n for n in CT_RATE_LABELS if n not in names]
    if missing:
        raise ConfigError(f"ctrate_classifier {str(folder)!r}: config.id2label lacks CT-RATE labels {missing[:3]} "
                          f"({len(missing)} missing); it names {names[:3]}...")
    cols = [names.index(n) for n in CT_RATE_LABELS]
    max_len = min(MAX_LENGTH, int(getattr(tok, "model_max_length", MAX_LENGTH) or MAX_LENGTH))
    out: list[dict[str, int]] = []
    for start in range(0, len(texts), batch_size):
        enc = tok(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt").to(device)
        with torch.no_grad():
            probs = torch.sigmoid(model(**enc).logits.float()).cpu()
        hits = (probs[:, cols] >= THRESHOLD).int().tolist()
        out += [dict(zip(CT_RATE_LABELS, row)) for row in hits]
    return out
