# Every target installs what it needs. The environment is a virtualenv in .venv that can see the
# system's packages, so a machine that already has torch (say a CUDA build) keeps it.
# Installs come from a lock of exact versions with hashes (requirements/lock.txt, data.txt);
# pyproject.toml keeps the ranges users install against. docs/dependencies.md says how to refresh.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt requirements/data.txt
# Readers of our exports, kept out of the environment (.venv/clients): tests load exports with them.
CLIENTS := requirements/clients.txt
# The torch stack is not in the lock: a machine that already has torch keeps it (and the triton
# it came with); where torch is absent these go in: the CPU wheel of torch 2.13.0 (pip takes the
# local one when there is one) and the triton that PyPI's torch 2.13.0 pins.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.7.1
# The lock is resolved for CPython 3.11 on Linux x86_64 (our machines and CI); elsewhere make
# installs from pyproject.toml's ranges and says so.
LOCKED := $(shell python3 -c "import platform, sys; print(int(sys.version_info[:2] == (3, 11) and platform.system() == 'Linux' and platform.machine() == 'x86_64'))")
# The fast-moving dependencies that make test-latest takes at their newest releases, the oldest
# transformers that make test-oldest tries (with the tokenizers and hub it needs), and the tests both run.
UPSTREAM := transformers huggingface_hub datasets safetensors wandb sae-lens fsspec s3fs
OLDEST := transformers==5.0.0 tokenizers==0.22.2 huggingface_hub==1.33.0
UPSTREAM_TESTS := tests/sae/test_environment.py tests/sae/test_hooks.py tests/sae/test_lm.py \
	tests/sae/test_hub.py tests/sae/test_io.py tests/sae/test_saelens_interop.py \
	tests/train/test_tracking.py tests/train/test_cache.py tests/eval/test_saelens_evals.py

# circuit-tracer's own environment (.venv-circuit-tracer): its pins clash with ours, so the suite runs
# it as a separate process (tests/sae/test_circuit_tracer.py) on what `sae export` writes.
CT_VENV := .venv-circuit-tracer
# SAEBench's own environment (.venv-sae-bench), for the same reason (numpy < 2, datasets < 4): the
# suite runs its evaluations there (tests/eval/test_saebench_agreement.py) and compares ours with them.
SB_VENV := .venv-sae-bench
# The suite runs in TEST_WORKERS pytest processes (pytest-xdist), a test file at a time each (its
# module fixtures are built once), torch single-threaded in each and in what they start: a second
# thread gains little on these small tests while the other worker's waits (subprocesses, clients,
# kills) leave a core idle; on 2 cores 12 min 18 s against 17 min 12 s in one (decision 62).
# Where a test runs torch on 2 threads (a child like CI's commands, or a run in the worker that
# must sum as that child does), an idle OpenMP thread sleeps instead of spinning on a core the
# other worker needs: a 100-step `sae train` took 31 s of CPU spinning, 10 s passive.
TEST_WORKERS ?= 2
# $(1): the environment's python
pytest = OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(1) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: install clients-venv demo test test-latest test-oldest lock bench lint clean

install: $(VENV)/.installed

# $(1): a virtualenv to fill from the lock; $(2): the installer (pip, or uv for side environments)
define install-locked
	test -x $(1)/bin/python || python3 -m venv --system-site-packages $(1)
	$(2) --require-hashes --no-deps -r requirements/lock.txt -r requirements/data.txt
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q --no-deps "$(TORCH)"
	$(1)/bin/python -c "import triton" 2>/dev/null || $(1)/bin/python -m pip install -q --no-deps "$(TRITON)"
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
endef

$(VENV)/.installed: pyproject.toml Makefile $(LOCK) $(CLIENTS)
ifeq ($(LOCKED),1)
	$(call install-locked,$(VENV),$(PY) -m pip install -q)
else
	@echo "note: requirements/lock.txt is for CPython 3.11 on Linux x86_64; installing from pyproject.toml's ranges"
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r requirements/data.in
endif
	test -d $(VENV)/clients/circuit_tracer || $(PY) -m pip install -q --no-deps --require-hashes \
		--target $(VENV)/clients -r $(CLIENTS)
	-command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q chromium >/dev/null 2>&1; } \
		|| echo "note: Debian chromium is not installed; the dashboard's browser test will be skipped"
	touch $@

clients-venv: $(CT_VENV)/.installed $(SB_VENV)/.installed

# $(1): a reference package's own virtualenv, filled from its lock $(2) over the torch wheel
define client-venv
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q --no-deps "$(TORCH)"
	$(VENV)/bin/uv pip install -q --python $(1)/bin/python --require-hashes --no-deps -r $(2)
	touch $(1)/.installed
endef

$(CT_VENV)/.installed: requirements/circuit-tracer.txt | install
	$(call client-venv,$(CT_VENV),$<)

$(SB_VENV)/.installed: requirements/sae-bench.txt | install
	$(call client-venv,$(SB_VENV),$<)

demo: install
	$(VENV)/bin/sae demo

test: install clients-venv
	$(PY) -m ruff check sae train eval tests bench requirements
	$(call pytest,$(PY)) --durations=15

# The newest allowed releases of UPSTREAM in a side environment (.venv-latest), then the tests that
# touch them; what moved against the lock is printed first. torch stays as installed.
test-latest: install clients-venv
	$(call install-locked,.venv-latest,$(VENV)/bin/uv pip install -q --python .venv-latest/bin/python)
	.venv-latest/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv-latest/torch.txt
	$(VENV)/bin/uv pip install -q --python .venv-latest/bin/python -U $(UPSTREAM) -c .venv-latest/torch.txt
	.venv-latest/bin/python requirements/changed.py $(LOCK)
	$(call pytest,.venv-latest/bin/python) -p no:cacheprovider $(UPSTREAM_TESTS)

# The oldest transformers pyproject.toml admits, over the rest of the lock (.venv-oldest).
test-oldest: install
	$(call install-locked,.venv-oldest,$(VENV)/bin/uv pip install -q --python .venv-oldest/bin/python)
	$(VENV)/bin/uv pip install -q --python .venv-oldest/bin/python --no-deps $(OLDEST)
	.venv-oldest/bin/python requirements/changed.py $(LOCK)
	$(call pytest,.venv-oldest/bin/python) -p no:cacheprovider tests/sae/test_environment.py \
		tests/sae/test_hooks.py tests/sae/test_lm.py

# Re-resolve the lock from pyproject.toml's ranges (newest allowed releases), with hashes.
# TORCH_WHEELS: a folder holding torch's CPU wheel, so the lock takes the CPU build's dependencies.
TORCH_WHEELS ?= /opt/wheels
lock: install
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes -q \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_WHEELS) -c requirements/torch-cpu.txt \
		--no-emit-package torch --no-emit-package triton -o requirements/lock.txt
	$(VENV)/bin/uv pip compile requirements/data.in --no-deps --generate-hashes -q \
		--python-version 3.11 -o requirements/data.txt
	$(VENV)/bin/uv pip compile requirements/circuit-tracer.in --generate-hashes -q \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_WHEELS) -c requirements/torch-cpu.txt \
		--no-emit-package torch --no-emit-package triton -o requirements/circuit-tracer.txt
	$(VENV)/bin/uv pip compile requirements/sae-bench.in --generate-hashes -q \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_WHEELS) -c requirements/torch-cpu.txt --no-emit-package torch \
		--no-emit-package triton --no-emit-package torchvision --no-emit-package nvidia-nccl-cu12 \
		-o requirements/sae-bench.txt

bench: install
	@for b in bench/*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) $$b || exit 1; done
	$(PY) bench/train.py --architectures batchtopk matryoshka_batchtopk --expansions 8 --name train-batchtopk

lint: install
	$(PY) -m ruff check sae train eval tests bench requirements
	$(PY) -m ruff format --check sae train eval tests bench requirements

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest $(CT_VENV) $(SB_VENV) .pytest_cache runs
