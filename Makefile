# One-command setup: `make demo` and `make test` create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.visiontune-installed
DEMO_OUT ?= demo-run
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install browser demo lint test bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,lite12]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(BIN)/python -c "import torch, torchvision, timm, visiontune" 
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/visiontune classify train --data examples/hymenoptera_sample --out $(DEMO_OUT) --overwrite --seed 0

# The report test renders RUN/report.html in headless Chromium (Debian packages; CI runs as root).
browser:
	@test -x /usr/bin/chromium || [ "$$(id -u)" = 0 ] || echo "note: not root, cannot apt-get install chromium; the report's browser test will be skipped"
	test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install browser lint
	$(BIN)/python -m pytest -q -ra --durations=10

bench-quick: install
	$(BIN)/python bench/classify.py --quick

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
