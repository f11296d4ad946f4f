# Seefood Studio. `make run` and `make test` do all the set-up they need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8501

.PHONY: setup run test test-fast bench lint format clean-data

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipeline ingest
	$(BIN)/streamlit run dashboard/app.py --server.address $(HOST) \
		--server.port $(PORT) --server.headless true \
		--browser.gatherUsageStats false

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-data:
	rm -rf data/studio.db data/studio.db-wal data/studio.db-shm data/artifacts
