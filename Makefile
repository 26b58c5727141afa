# Two commands do all the set-up on a fresh machine:
#   make demo   - the main job on the fixture pair (extract -> merge -> export -> validate)
#   make test   - installs what the tests need and runs them
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade-strategy only-if-needed -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/surgery demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
