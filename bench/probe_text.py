"""Reading probe for a stage-0 text export: can its LLM answer a closed question from the study's
report, before any image is involved? It tells, in one text stage instead of a whole demo,
whether the text stage has learnt to read at all (README, "The demo").

    python bench/probe_text.py --checkpoint runs/demo/stage0_text/final \\
        --test runs/demo/data/test/manifest.jsonl

For every closed VQA record of the test manifest (questions with choices) the LLM gets the
text-stage prompt, "<report of the same study>\\n<question with choices>" (`data.text_context:
report`), and again the question alone; greedy decoding of a few tokens, scored on the letter.
Prints the accuracy per question type and overall, with and without the report (chance 0.25;
without the report only the answer priors are left).
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch

from medvlm3d.data.prompts import encode_prompt, format_record
from medvlm3d.data.readers import read_records
from medvlm3d.model.checkpoint import load_pretrained


@torch.no_grad()
def answer_letter(llm: Any, tokenizer: Any, question: str, max_new_tokens: int = 4) -> str:
    """The first character the LLM generates after the text-only prompt of `question` (greedy)."""
    ids = torch.tensor([encode_prompt(tokenizer, question, 1, n_images=0)])
    out = llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()[:1]


def probe(checkpoint: str, manifest: str) -> dict[str, dict[str, float]]:
    """{"with_report" | "question_only": {question type | "all": accuracy}} over the closed records."""
    model = load_pretrained(checkpoint).eval()
    records = read_records(manifest)
    reports = {r["image"]: r["answer"] for r in records if r.get("task") == "report"}
    closed = [r for r in records if r.get("task") == "vqa" and r.get("choices")]
    if not closed:
        raise ValueError(f"{manifest}: no closed VQA records (questions with choices) to probe")
    missing = [r["id"] for r in closed if r["image"] not in reports]
    if missing:
        raise ValueError(f"{manifest}: closed records without a report record of the same image, e.g. {missing[:3]}")
    result: dict[str, dict[str, float]] = {}
    for name, with_report in (("with_report", True), ("question_only", False)):
        hits, seen = Counter(), Counter()
        for r in closed:
            question, target = format_record(r, "vqa")
            prompt = f"{reports[r['image']]}\n{question}" if with_report else question
            kind = str(r.get("question_type") or "untyped")  # never "all", which counts every record
            hit = answer_letter(model.llm, model.tokenizer, prompt) == target[:1]
            hits[kind] += hit
            hits["all"] += hit
            seen[kind] += 1
            seen["all"] += 1
        result[name] = {k: hits[k] / seen[k] for k in seen}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a stage0_text export (save_pretrained folder)")
    parser.add_argument("--test", required=True, help="held-out manifest with report and closed VQA records")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = probe(args.checkpoint, args.test)
    kinds = [k for k in result["with_report"] if k != "all"] + ["all"]
    print(f"{args.checkpoint}: closed-VQA letter accuracy of the text-only LLM")
    print(f"{'prompt':<14}" + "".join(f"{k:>10}" for k in kinds))
    for name, acc in result.items():
        print(f"{name:<14}" + "".join(f"{acc[k]:>10.3f}" for k in kinds))


if __name__ == "__main__":
    main()
