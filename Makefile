# secura-plugins: the two commands a newcomer needs.
#   make demo   set up .venv (first time: ~5 min) and run the offline demo on a tiny model
#   make test   set up .venv and run lint + the whole test suite (what CI runs)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c .ci/constraints.txt -e ".[trl,axolotl,test]"
	touch $(STAMP)

demo: setup
	TQDM_DISABLE=1 $(PY) -m secura_plugins.demo

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV)
