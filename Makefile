# secura-plugins: the two commands a newcomer needs, and a quick check while editing.
#   make demo   set up .venv (first time: ~5 min) and run the offline demo on the real model
#   make test   set up both environments, run lint + the test suite (what CI runs):
#               .venv            axolotl 0.19.0's pins (transformers 5.16, trl 1.9, peft 0.20):
#                                every tier (tests/unit, tests/integration, tests/e2e)
#               .venv-trl-latest the newest TRL (it needs a newer transformers than axolotl):
#                                the unit and integration tiers (-m "not e2e") and the
#                                e2e resume tests (checkpoints are TRL/transformers-bound)
#   make test-quick  the unit tier only (tests/unit + the doctests), in .venv: ~1 CPU-minute
# Both environments install from the locks in .ci/ (every package pinned, --no-deps), so a
# fresh clone tests exactly what was tested here. `make lock` re-resolves them from the
# ranges in pyproject.toml (then run make clean test and commit the two lock files).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LATEST := .venv-trl-latest
LOCK_MAIN   := .ci/lock-main.txt
LOCK_LATEST := .ci/lock-trl-latest.txt

# $(call venv_from_lock,VENV,LOCK): a fresh venv holding exactly LOCK, plus this package.
define venv_from_lock
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet --no-deps -r $(2)
	$(1)/bin/python -m pip install --quiet --no-deps -e .
	touch $(1)/.installed
endef

.PHONY: setup demo test test-quick test-main test-trl-latest lint bench-guard lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK_MAIN)
	$(call venv_from_lock,$(VENV),$(LOCK_MAIN))

$(LATEST)/.installed: pyproject.toml $(LOCK_LATEST)
	$(call venv_from_lock,$(LATEST),$(LOCK_LATEST))

lock:
	bash .ci/lock.sh main
	bash .ci/lock.sh trl-latest

demo: setup
	TQDM_DISABLE=1 $(VENV)/bin/secura demo --threads 1

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

# The unit tier (tests/conftest.py describes the tiers): no Trainer run, no subprocess.
test-quick: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/unit secura_plugins

test-trl-latest: $(LATEST)/.installed
	$(LATEST)/bin/python -c "import trl, transformers, peft; print('newest TRL env:', trl.__version__, transformers.__version__, peft.__version__)"
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider -m "not e2e" --ignore=secura_plugins/integrations/axolotl
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_resume.py

# Mutation check (not in CI, ~11 min): one-line breakages the named tests must catch.
mutants: setup
	OMP_NUM_THREADS=1 $(PY) tools/mutants.py

clean:
	rm -rf $(VENV) $(LATEST)
