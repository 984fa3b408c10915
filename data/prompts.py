"""Prompts: record -> (question, target) text, and text -> token ids with label masking.

    IMAGE_TOKEN = "<image>"
    format_record(rec, task="") -> (question_text, target_text)
    shuffle_choices(rec) -> rec with its closed choices in a new order (torch RNG), letter updated
    encode_example(tokenizer, question, target, num_image_tokens, n_images=1, max_len=256,
                   record_id="") -> {"input_ids": list[int], "labels": list[int], "attention_mask": list[int]}
    encode_prompt(tokenizer, question, num_image_tokens, n_images=1) -> list[int]
    image_token_id(tokenizer) -> int

Text formats (M3D, see shared/FORMATS.md):
- report, and open VQA: the record's question; the target is its answer.
- closed VQA: question + " Choices: A. <A> B. <B> C. <C> D. <D>"; the target is "<letter>. <answer>".

Prompt layout. The user message is "<image>\\n" * n_images + question. With a tokenizer that
has a chat template it is rendered by `tokenizer.apply_chat_template(..., add_generation_prompt=True)`
(for the tokenizer of data/tokenizer.py: "<s>user: <image>\\nQ\\nassistant: "); without one,
the plain template "USER: <content>\\nASSISTANT: " is used, preceded by the bos token when the
tokenizer has one. The rendered prompt is tokenized without adding special tokens (the
template writes its own), and every `<image>` token is then expanded into `num_image_tokens`
copies of the image token id, as HF VLM processors do; the model overwrites those positions
with visual tokens. `n_images=0` gives the same prompt without any image (stage0_text), so a
text-only example is tokenized exactly like an image one, the image tokens aside.

A training example is prompt ids + target ids + [eos] (the target tokenized on its own, no
specials). `labels` are -100 over the prompt (image tokens included) and equal `input_ids`
over the target and the final eos, so only the answer is supervised. Since the prompt part is
exactly `encode_prompt(...)`, training and generation prompts are identical token for token.
`max_len` bounds the whole sequence, image tokens included. When it is exceeded, the target is
cut from the end (and then has no eos, since the answer did not end); the prompt and its image
tokens are never cut, and a prompt that leaves no room for one target token is a `DataError`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from .errors import DataError

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PLAIN_TEMPLATE = "USER: {content}\nASSISTANT: "
TASKS = ("", "report", "vqa", "vqa_closed", "vqa_open")
IGNORE_INDEX = -100
_LETTERS = "ABCDEFGHIJ"


# --------------------------------------------------------------------------------------------
# record -> text


def _where(rec: dict[str, Any]) -> str:
    return f"record {rec.get('id', '?')!r}"


def _closed_letter(rec: dict[str, Any], choices: Sequence[str]) -> str:
    letters = _LETTERS[: len(choices)]
    letter = str(rec.get("answer_choice") or "").strip().rstrip(".").upper()
    if not letter:
        matches = [letters[i] for i, c in enumerate(choices) if str(c).strip() == rec["answer"].strip()]
        if len(matches) != 1:
            raise DataError(
                f"{_where(rec)}: closed VQA needs 'answer_choice' (a letter) or an answer equal to "
                f"exactly one of the choices; answer {rec['answer']!r} matches {len(matches)}"
            )
        letter = matches[0]
    if letter not in letters:
        raise DataError(f"{_where(rec)}: answer_choice {letter!r} must be one of {list(letters)}")
    return letter


def format_record(rec: dict[str, Any], task: str = "") -> tuple[str, str]:
    """(question_text, target_text) of a manifest record for `task`.

    `task`: "" keeps the record's own task (a VQA record with choices is closed, without them
    open); "report" and "vqa_open" give (question, answer); "vqa_closed" needs choices; "vqa"
    is closed when the record has choices, else open.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if not isinstance(rec, dict):
        raise DataError(f"a record must be a dict, got {type(rec).__name__}")
    question, answer = rec.get("question"), rec.get("answer")
    if not isinstance(question, str):
        raise DataError(f"{_where(rec)}: 'question' must be a string, got {question!r}")
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{_where(rec)}: 'answer' must be a non-empty string, got {answer!r}")
    rec_task = rec.get("task", "")
    if rec_task not in ("report", "vqa"):
        raise DataError(f"{_where(rec)}: 'task' must be 'report' or 'vqa', got {rec_task!r}")
    mode = task or rec_task
    if mode in ("report", "vqa_open"):
        return question, answer
    choices = rec.get("choices") or []
    if not isinstance(choices, (list, tuple)) or len(choices) > len(_LETTERS):
        raise DataError(f"{_where(rec)}: 'choices' must be a list of at most {len(_LETTERS)} strings, got {choices!r}")
    if not choices:
        if mode == "vqa_closed":
            raise DataError(f"{_where(rec)}: task 'vqa_closed' needs 'choices' in the record")
        return question, answer
    letter = _closed_letter(rec, choices)
    listed = " ".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question} Choices: {listed}", f"{letter}. {answer}"


def shuffle_choices(rec: dict[str, Any], generator: Any = None) -> dict[str, Any]:
    """A copy of a closed VQA record with its choices in a random order (drawn from `generator`,
    a torch.Generator; None: torch's global RNG) and `answer_choice` moved with its answer.
    Training draws from a generator seeded per sample (data/dataset.py: sample_generator).

    Training augmentation (`data.shuffle_choices`): a record seen in one fixed order lets a model
    learn which letter goes with which question rather than how to read the listed letters.
    Records without choices come back unchanged.
    """
    choices = rec.get("choices") or []
    if len(choices) < 2:
        return rec
    import torch  # late: this module stays importable without torch

    correct = _LETTERS.index(_closed_letter(rec, choices))
    order = torch.randperm(len(choices), generator=generator).tolist()
    new = [choices[k] for k in order]
    return {**rec, "choices": new, "answer_choice": _LETTERS[order.index(correct)]}


# --------------------------------------------------------------------------------------------
# text -> ids


def image_token_id(tokenizer: Any) -> int:
    """Id of `IMAGE_TOKEN`; ValueError when the tokenizer does not hold it as one token."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk):
        raise ValueError(
            f"the tokenizer has no {IMAGE_TOKEN!r} token: add it as a special token "
            f"(tokenizer.add_special_tokens({{'extra_special_tokens': [{IMAGE_TOKEN!r}]}})) "
            f"or train one with medvlm3d.data.tokenizer.train_tokenizer"
        )
    if tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] != [tid]:
        raise ValueError(f"the tokenizer splits {IMAGE_TOKEN!r}; it must be an added special token")
    return int(tid)


def _check_args(num_image_tokens: int, n_images: int) -> None:
    if int(num_image_tokens) < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    if int(n_images) < 0:
        raise ValueError(f"n_images must be >= 0 (0: a text-only prompt), got {n_images}")


def _prompt_text(tokenizer: Any, question: str, n_images: int) -> str:
    content = f"{IMAGE_TOKEN}\n" * n_images + question
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    bos = getattr(tokenizer, "bos_token", None) or ""
    return bos + PLAIN_TEMPLATE.format(content=content)


def encode_prompt(
    tokenizer: Any, question: str, num_image_tokens: int, n_images: int = 1, record_id: str = ""
) -> list[int]:
    """Token ids of the generation prompt (up to where the assistant starts), with each image
    placeholder expanded into `num_image_tokens` image token ids."""
    _check_args(num_image_tokens, n_images)
    where = f"record {record_id!r}" if record_id else "prompt"
    if not isinstance(question, str):
        raise DataError(f"{where}: the question must be a string, got {type(question).__name__}")
    if IMAGE_TOKEN in question:
        raise DataError(f"{where}: the question must not contain {IMAGE_TOKEN!r}; images are placed by the template")
    ids = tokenizer(_prompt_text(tokenizer, question, n_images), add_special_tokens=False)["input_ids"]
    if n_images == 0:
        return list(ids)
    img = image_token_id(tokenizer)
    found = sum(1 for t in ids if t == img)
    if found != n_images:
        raise DataError(f"{where}: the rendered prompt holds {found} {IMAGE_TOKEN} tokens, expected {n_images}")
    out: list[int] = []
    for t in ids:
        out.extend([img] * int(num_image_tokens) if t == img else [t])
    return out


def encode_example(
    tokenizer: Any,
    question: str,
    target: str,
    num_image_tokens: int,
    n_images: int = 1,
    max_len: int = 256,
    record_id: str = "",
) -> dict[str, list[int]]:
    """input_ids = encode_prompt(...) + target ids + [eos]; labels -100 over the prompt.

    Returns plain lists of ints (the dataset turns them into tensors). `max_len` counts every
    token, image tokens included; see the module docstring for truncation.
    """
    where = f"record {record_id!r}" if record_id else "example"
    prompt = encode_prompt(tokenizer, question, num_image_tokens, n_images, record_id=record_id)
    if not isinstance(target, str) or not target.strip():
        raise DataError(f"{where}: the target must be a non-empty string, got {target!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token")
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [int(eos)]
    room = int(max_len) - len(prompt)
    if room < 2:  # at least one target token (an eos alone teaches nothing)
        raise DataError(
            f"{where}: the prompt takes {len(prompt)} tokens ({n_images} image(s) x {num_image_tokens} "
            f"image tokens included), which leaves no room for the target within max_len={max_len}; "
            f"raise data.max_text_len or shorten the question"
        )
    if len(answer) > room:
        logger.debug("%s: target cut from %d to %d tokens (max_len=%d)", where, len(answer), room, max_len)
        answer = answer[:room]
    input_ids = prompt + answer
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "attention_mask": [1] * len(input_ids),
    }
