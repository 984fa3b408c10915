# make demo : the embedded default end to end on CPU (phantoms -> tokenizer -> stages 0-2 -> eval)
# make test : the test suite
# Both create .venv when it is missing. torch and torchvision are installed first, as a pinned
# pair (see ENVIRONMENT notes: a mismatched torchvision breaks timm/peft/transformers imports).

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medvlm3d-installed
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medvlm3d demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
