# secura-plugins: the two commands a newcomer needs.
#   make demo   set up .venv (first time: ~5 min) and run the offline demo on a tiny model
#   make test   set up both environments, run lint + the whole test suite (what CI runs):
#               .venv            axolotl 0.19.0's pins (transformers 5.16, trl 1.9, peft 0.20)
#               .venv-trl-latest the newest TRL (it needs a newer transformers than axolotl)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LATEST := .venv-trl-latest

.PHONY: setup demo test test-main test-trl-latest lint bench-guard clean

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c .ci/constraints.txt -e ".[trl,axolotl,test]"
	touch $(STAMP)

$(LATEST)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST)/bin/python -m pip install --quiet -c .ci/constraints.txt -e ".[trl,test]" "trl>=1.16"
	touch $@

demo: setup
	TQDM_DISABLE=1 $(VENV)/bin/secura demo

lint: setup
	$(VENV)/bin/ruff check .

test: lint bench-guard test-main test-trl-latest

# Speed regression guard (issue 6): SECURA/CURLoRA step time vs LoRA on quarter-width
# Llama shapes, one thread, CPU-time clock, medians of alternating rounds (~30 s).
# Fails only on a gross regression (> 1.5x LoRA); the measured ratios are about 1.0-1.1.
bench-guard: setup
	TQDM_DISABLE=1 $(PY) benchmarks/speed.py --quick --check 1.5

test-main: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-trl-latest: $(LATEST)/.installed
	$(LATEST)/bin/python -c "import trl, transformers, peft; print('newest TRL env:', trl.__version__, transformers.__version__, peft.__version__)"
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/test_axolotl.py --ignore=secura_plugins/integrations/axolotl

# Mutation check (not in CI, ~11 min): one-line breakages the named tests must catch.
mutants: setup
	OMP_NUM_THREADS=1 $(PY) tools/mutants.py

clean:
	rm -rf $(VENV) $(LATEST)
