# Three commands do all the set-up on a fresh machine:
#   make demo   - the main job on the fixture pair (extract -> merge -> export -> validate)
#   make test   - installs what the tests need and runs them
#   make lint   - installs the pinned ruff and mypy (the `lint` extra) and runs them, plus
#                 the function-size check (no function in surgery/ over 60 lines)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: demo test lint install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade-strategy only-if-needed -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

$(BIN)/.lint-installed: $(BIN)/.installed
	$(BIN)/pip install --upgrade-strategy only-if-needed -c constraints.txt -e '.[lint]'
	touch $@

demo: install
	$(BIN)/surgery demo

test: install
	$(BIN)/python -m pytest -q

# Every check runs even when an earlier one fails; the target fails if any did.
lint: $(BIN)/.lint-installed
	@status=0; \
	echo "ruff check surgery tests"; $(BIN)/ruff check surgery tests || status=1; \
	echo "mypy surgery"; $(BIN)/mypy surgery || status=1; \
	echo "function size (max 60 lines)"; $(BIN)/python tools/check_function_size.py surgery || status=1; \
	exit $$status

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
