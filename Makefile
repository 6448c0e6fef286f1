# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel keeps set-up to minutes; an unpinned torch may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: venv demo test bench bench-quick clean

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

# Every solver against its peers, side by side (peers from the optional `bench` extra). Takes a while;
# `make bench-quick` is a smoke run with reduced sizes.
bench: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/mnn_solver.py
	$(BIN)/python benchmarks/ode.py --compile
	$(BIN)/python benchmarks/sde_cde.py
	$(BIN)/python benchmarks/discovery.py

bench-quick: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/mnn_solver.py --quick
	$(BIN)/python benchmarks/ode.py --quick
	$(BIN)/python benchmarks/sde_cde.py --quick
	$(BIN)/python benchmarks/discovery.py --quick

clean:
	rm -rf $(VENV) demo-output .pytest_cache
