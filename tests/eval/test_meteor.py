"""METEOR equals HF evaluate's `meteor` (nltk meteor_score, word_tokenize, WordNet 3.0) offline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from medvlm3d.eval.metrics import METRICS, meteor_nltk, nltk_data

# (prediction, reference): synonyms, stems, word order, punctuation, abbreviations, no match
PAIRS = [
    ("It is a guide to action which ensures that the military always obeys the commands of the party",
     "It is a guide to action that ensures that the military will forever heed Party commands"),
    ("A large tumor in the liver.", "A big tumour in the liver."),
    ("The kidneys are enlarged.", "Both kidney is enlarging."),
    ("liver lesion hypodense left", "Hypodense lesion in the left liver."),
    ("No pleural effusion. Heart size normal.", "Heart size is normal. There is no pleural effusion."),
    ("Dr. Smith saw a 3 cm. mass near the spleen.", "A 3 cm mass is seen adjacent to the spleen."),
    ("The patient shows a minor fracture of the rib", "The patient has a small break of the rib"),
    ("identical words here", "identical words here"),
    ("completely unrelated text", "pulmonary nodules bilaterally"),
    ("The lungs are clear, no consolidation; mild atelectasis (left base).",
     "Mild left basal atelectasis, lungs otherwise clear without consolidation."),
]


@pytest.fixture(scope="module")
def wordnet():
    """A fresh WordNetCorpusReader over the installed WordNet 3.0 (nltk reads only folders on its
    data path, so it is the folder nltk.data.find gives, not a temporary one)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        nltk_data.ensure()
    except RuntimeError as e:
        pytest.fail(f"offline NLTK data missing (make install installs it): {e}")
    reader = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    assert reader.get_version() == "3.0" and len(list(reader.all_synsets("n"))) == 82115  # WordNet 3.0's nouns
    return reader


def test_equal_to_nltk_meteor_score_with_wordnet_per_sample(wordnet):
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    ours = meteor_nltk(preds, refs)
    direct = [meteor_score([word_tokenize(r)], word_tokenize(p), alpha=0.9, beta=3, gamma=0.5, wordnet=wordnet)
              for p, r in PAIRS]
    assert ours == pytest.approx(direct, abs=1e-6)
    assert METRICS.get("meteor")(preds, refs, [])["meteor"] == pytest.approx(np.mean(direct), abs=1e-6)
    # evaluate's and nltk's documented example (real nltk WordNet 3.0): 0.6944
    assert round(ours[0], 4) == 0.6944
    assert ours[7] == pytest.approx(1.0 - 0.5 * (1 / 3) ** 3) and ours[8] == 0.0


def test_wordnet_synonyms_and_stems_are_used(wordnet):
    """Synonyms (WordNet) and stems (Porter) raise the score over exact matching only."""
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    class NoSynonyms:
        def synsets(self, word):
            return []

    p, r = PAIRS[6]
    exact = meteor_score([word_tokenize(r)], word_tokenize(p), wordnet=NoSynonyms())
    assert meteor_nltk([p], [r])[0] > exact + 0.01  # minor~small, break~fracture, shows~has
    assert len(wordnet.synsets("tumor")) > 0 and "tumour" in wordnet.synsets("tumor")[0].lemma_names()
    stems = meteor_nltk(["the kidneys enlarged"], ["the kidney enlarging"])[0]
    assert stems == pytest.approx(meteor_nltk(["the kidney enlarging"], ["the kidney enlarging"])[0])


def test_word_order_and_multiple_references():
    same, swapped = meteor_nltk(["a b c d e f"], ["a b c d e f"])[0], meteor_nltk(["d e f a b c"], ["a b c d e f"])[0]
    assert swapped < same  # fragmentation penalty
    best = meteor_nltk(["the cat sat"], [["a dog ran", "the cat sat"]])[0]
    assert best == pytest.approx(meteor_nltk(["the cat sat"], ["the cat sat"])[0])


def test_tokenization_is_nltk_word_tokenize_with_punkt_english():
    from nltk import word_tokenize

    nltk_data.ensure()
    assert word_tokenize("Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks.") == [
        "Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy", "me", "two", "of",
        "them", ".", "Thanks", "."]  # nltk's documented output
    assert word_tokenize("Dr. Smith saw it. No effusion.")[:2] == ["Dr.", "Smith"]  # Punkt's abbreviation list


def test_lexnames_match_the_wordnet_man_page_names():
    lines = nltk_data.LEXNAMES.splitlines()
    assert len(lines) == 45 and lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
    assert lines[44] == "44\tadj.ppl\t3" and lines[29] == "29\tverb.body\t2"


@pytest.mark.skipif(shutil.which("java") is None, reason="the METEOR-1.5 jar needs java")
@pytest.mark.slow
def test_jar_option_still_runs():
    out = METRICS.get("meteor_1.5")(["a cat sat on a mat", "liver"], ["the cat sat on the mat", "kidney"], [])
    assert 0.0 < out["meteor_1.5"] < 1.0
