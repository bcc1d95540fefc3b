# `make run` and `make test` each create and fill .venv when it is missing.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench fuzz docs check-wheel figures clean

$(STAMP): pyproject.toml scripts/setup_venv.sh
	sh scripts/setup_venv.sh $(VENV)
	touch $@

# The chapter's matrix script: its unit tests first, then the scenarios and their analysis.
run: $(STAMP)
	@echo "=== Unit tests ==="
	$(PY) -m pytest -q -p no:cacheprovider -p no:xdist tests/test_matformer_unit.py
	$(VENV)/bin/matsim matrix --config-path ffn-small --out results

test: $(STAMP)
	$(PY) -m pytest -n auto

# Benchmarks as ratios against a bare baseline in the same run (see README).
bench: $(STAMP)
	$(PY) -m pytest benchmarks -p no:xdist --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds

# Coverage-guided fuzzing of the properties with HypoFuzz for FUZZ_SECONDS on every core;
# what it finds replays under pytest and scripts/reproduce.sh (scripts/fuzz.sh).
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	sh scripts/fuzz.sh $(FUZZ_SECONDS)

# The docs site (mkdocs.yml, docs/), built as CI builds it: any warning is an error.
docs: $(STAMP)
	$(PY) -m scripts.tables --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir results/site

# The wheel in a clean venv outside the checkout, with the shipped configs (scripts/check_wheel.sh).
check-wheel: $(STAMP)
	sh scripts/check_wheel.sh

# Every published figure measured again at this commit, then the docs' tables regenerated
# (scripts/figures.sh; FIGURES=matrix bench ... for some; PSYCHE=checkout for Psyche's configs).
figures: $(STAMP)
	sh scripts/figures.sh $(FIGURES)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
