# Two commands on a fresh machine:  `make run` (the whole demo pipeline)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch keeps the demo small; on a GPU cluster use your site's CUDA torch
# (e.g. `make venv TORCH_SPEC=torch==2.13.0 PIP_TORCH_ARGS="--index-url <your torch index>"`).
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
CORES ?= all

.PHONY: venv slurm-profile run test lint bench bench-gpu clean

venv: $(VENV)/.installed slurm-profile

# `snakemake --profile slurm` finds it by name (a profile of yours already there is kept).
slurm-profile:
	@bash tools/install_slurm_profile.sh

$(VENV)/.installed: pyproject.toml
	@# Snakemake 9 needs Python 3.11; an older interpreter would fail later, deep in pip's resolver.
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "$(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); DuPLUS needs >= 3.11 (snakemake>=9): make ... PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so that no dependency can pull a different (multi-GB) build.
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,slurm]" "$(TORCH_SPEC)"
	@# rt-utils asks for opencv-python, whose GUI build needs libGL; the headless build (declared) gives the same cv2.
	@# Both install into cv2/, so removing one removes shared files: the headless build is put back
	@# after, at the version pip resolved with its dependencies.
	$(BIN)/python -m pip uninstall --quiet -y opencv-python
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
		"opencv-python-headless==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opencv-python-headless"))')"
	touch $@

run: venv
	$(BIN)/snakemake --profile profiles/default --cores $(CORES) all

TEST_ENV := PYTHONUTF8=1 DUPLUS_NO_PROGRESS=1 HF_HUB_OFFLINE=1

# The whole suite, then the tests that assert a learning outcome once more on torch's portable
# kernels with two threads: other kernels and reduction orders, the closest one machine gets to
# another CPU, so that an outcome on a knife edge fails here rather than on a user's machine.
test: venv
	$(TEST_ENV) $(BIN)/python -m pytest -q
	$(TEST_ENV) ATEN_CPU_CAPABILITY=default DUPLUS_TEST_THREADS=2 $(BIN)/python -m pytest -q -m learning

# Static checks, each configured in one place: ruff ([tool.ruff] in pyproject.toml), snakefmt's
# formatting of the workflow ([tool.snakefmt]), Snakemake's own lint (it exits 0 on the workflow as it
# is, and CI keeps it so), then a dry run that plans every job of the demo.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile rules/
	$(BIN)/snakemake --lint
	$(BIN)/snakemake -n all

bench: venv
	$(BIN)/python bench/inference.py --preset tiny --size 128 128 96

# On a GPU node (about 8 minutes, 9 at most): training, inference and loader at the paper size, JSON per script.
bench-gpu: venv
	PYTHON=$(BIN)/python bash bench/gpu_suite.sh bench/results

# The demo's files only: downloaded datasets, results/paper and logs/paper (config/paper.yaml) stay.
clean:
	rm -rf data/raw/demo_* data/preprocessed/demo_* $(filter-out logs/paper,$(wildcard logs/*)) \
		$(addprefix results/,pretrain prompts evaluate baseline lora prognosis report)
