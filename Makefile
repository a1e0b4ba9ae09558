# llmproxy developer commands. `make help` lists them.
# Every target installs into .venv first if needed, so a fresh clone needs only `make run` / `make test`.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/dev.yml
TRIAL  := $(PY) -m twisted.trial
SRC    := llmproxy tests twisted/plugins bench

.DEFAULT_GOAL := help
.PHONY: help install buildinfo build dev run demo test test-unit test-e2e check fmt fmt-check lint typecheck bench soak \
        version clean test-openai test-anthropic test-gemini test-health env-check test-all

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat editable mode puts the checkout on sys.path, so twistd finds twisted/plugins/.
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(MAKE) --no-print-directory buildinfo
	touch $(STAMP)

buildinfo: ## record the git commit and build time in llmproxy/_build.json
	@printf '{"commit": "%s", "built_at": "%s"}\n' "$$(git rev-parse HEAD 2>/dev/null)" \
		"$$(date -u +%Y-%m-%dT%H:%M:%SZ)" > llmproxy/_build.json

install: $(STAMP) ## create .venv and install llmproxy with its dev tools

build: $(STAMP) buildinfo ## build the wheel and sdist into dist/
	$(PY) -m build --outdir dist .

run: $(STAMP) ## serve with configs/dev.yml (override: make run CONFIG=...)
	$(VENV)/bin/twistd -n --pidfile= llmproxy --config $(CONFIG)

demo: $(STAMP) ## see it work, no key needed: fake providers, steady traffic, the status page
	$(PY) -m llmproxy.testing.demo

dev: $(STAMP) ## run, restarting whenever a file under llmproxy/ or configs/ changes
	$(PY) -m llmproxy.devserver --config $(CONFIG)

test: $(STAMP) ## every test: unit, end-to-end, SDK compatibility (live tests skip without keys)
	$(TRIAL) llmproxy.test tests

test-unit: $(STAMP) ## unit tests only
	$(TRIAL) llmproxy.test

check: fmt-check lint typecheck ## format check + lint + typecheck

fmt: $(STAMP) ## format the code
	$(VENV)/bin/ruff format $(SRC)
	$(VENV)/bin/ruff check --fix --select I $(SRC)

fmt-check: $(STAMP)
	$(VENV)/bin/ruff format --check $(SRC)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check $(SRC)

typecheck: $(STAMP) ## mypy --strict
	$(VENV)/bin/mypy llmproxy tests bench twisted/plugins/llmproxy_plugin.py

bench: $(STAMP) ## benchmarks: direct vs proxied, ratios (see bench/README.md)
	$(PY) -m bench.run $(BENCH_ARGS)

soak: $(STAMP) ## 30-minute mixed load: RSS, open files, access lines = records (SOAK_ARGS="--seconds 120")
	$(PY) -m bench.soak $(SOAK_ARGS)

version: $(STAMP) ## print the build information
	$(PY) -m llmproxy version

clean: ## remove the venv, build output and caches
	rm -rf $(VENV) build dist *.egg-info _trial_temp* .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

test-openai: $(STAMP) ## live tests against api.openai.com (skipped without OPENAI_API_KEY)
	$(TRIAL) tests.live.test_openai

test-anthropic: $(STAMP) ## live tests against Anthropic (skipped without ANTHROPIC_API_KEY)
	$(TRIAL) tests.live.test_anthropic

test-gemini: $(STAMP) ## live tests against Gemini (skipped without GEMINI_API_KEY)
	$(TRIAL) tests.live.test_gemini

test-health: $(STAMP) ## live /health test
	$(TRIAL) tests.live.test_health

env-check: $(STAMP) ## say which provider keys are set (never prints them)
	$(PY) -m tests.live.envcheck

test-all: $(STAMP) ## every live test
	$(TRIAL) tests.live
