# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel keeps set-up to minutes; an unpinned torch may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: venv demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

# The main job: discover the Lorenz equations from noisy simulated data with SINDy and with an MNN.
demo: venv
	MPLBACKEND=Agg $(BIN)/torchmech discover --out demo-output

test: venv
	MPLBACKEND=Agg $(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/mnn_solver.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
