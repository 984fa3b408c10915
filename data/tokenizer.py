"""Train a small byte-level BPE tokenizer for the embedded default (no hub, no download).

    train_tokenizer(texts, out_dir, vocab_size=1000) -> transformers.PreTrainedTokenizerFast

The tokenizer keeps case (closed-VQA letters such as "A." / "B." matter) and every byte is in
its alphabet, so no text is ever mapped to <unk>. Special tokens, in id order:

    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>   4 <image> (`IMAGE_TOKEN`, extra special token)

It carries a chat template (`CHAT_TEMPLATE`, a Jinja string) with user/assistant turns:

    "<s>user: {question}\\nassistant: {answer}</s>"

and with `add_generation_prompt=True` the rendered prompt ends with "assistant: ", the point at
which the model starts to answer. `data/prompts.py` builds the training and generation prompts
from this template. The result is saved with `save_pretrained(out_dir)`, so it reloads with
`AutoTokenizer.from_pretrained(out_dir)` or `PreTrainedTokenizerFast.from_pretrained(out_dir)`.

Training is deterministic (same texts -> same vocabulary) and takes about a second on a few
thousand short texts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .prompts import IMAGE_TOKEN

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)

# One user turn, then the assistant's answer closed by eos. Other roles (e.g. "system") are
# written as "<role>: <content>\n". String literals keep the exact whitespace.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'assistant: ' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

# Fixed template words, added to the training texts so that they become whole tokens.
_TEMPLATE_TEXT = "user: \nassistant: "

_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def _texts(texts: Iterable[str]) -> Iterator[str]:
    """The texts, each followed by the template words (every example holds one chat turn)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"train_tokenizer: text #{i} must be a str, got {type(t).__name__}")
        yield t
        yield _TEMPLATE_TEXT


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Train a case-keeping byte-level BPE on `texts`, save it to `out_dir` and return it.

    `vocab_size` counts the 256 byte symbols and the 5 special tokens, so it must be at least
    261; a small corpus may give fewer tokens than asked. The returned tokenizer has bos/eos/
    pad/unk set, `<image>` as an extra special token and `chat_template` = `CHAT_TEMPLATE`.
    """
    if int(vocab_size) < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(texts), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
        model_max_length=int(model_max_length),
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    logger.info("trained a byte-level BPE tokenizer: %d tokens, saved to %s", len(fast), out)
    return fast
