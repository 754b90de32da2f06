# Two entry points for a fresh machine: `make run` (set up + launch the app), `make test` (set up + all tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 7860

.PHONY: run test browser clean gpu-check soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# the pinned set first, then this checkout as an editable package (no further dependencies): `lvlm-interpret`
$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime
	$(BIN)/python app.py --port $(PORT)

# Browser tests drive Debian's Chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(VENV)/.dev browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# On a CUDA machine (about 12 minutes on one H100 or H200, nothing downloaded): the CUDA tests, then bench on the 7B-
# and 2B-shaped random models in bfloat16, and iGOS++ alone on the 7B one (once: its masks take minutes); their
# figures go to docs/results-gpu.md.
gpu-check: $(VENV)/.dev
	@$(BIN)/python -c "import sys, torch; torch.cuda.is_available() or \
		sys.exit('make gpu-check needs a CUDA GPU, and torch sees none on this machine')"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu
	HF_HUB_OFFLINE=1 $(BIN)/python -m lvlm_interpret bench --model random:llava-7b --dtype bfloat16 --device cuda \
		--out test-artifacts/gpu-check/llava-7b.json
	HF_HUB_OFFLINE=1 $(BIN)/python -m lvlm_interpret bench --model random:qwen2_vl-2b --dtype bfloat16 --device cuda \
		--out test-artifacts/gpu-check/qwen2_vl-2b.json
	HF_HUB_OFFLINE=1 $(BIN)/python -m lvlm_interpret bench --model random:llava-7b --dtype bfloat16 --device cuda \
		--methods igos --repeats 1 --out test-artifacts/gpu-check/llava-7b-igos.json
	$(BIN)/python -m lvlm_interpret bench-report test-artifacts/gpu-check/llava-7b.json \
		test-artifacts/gpu-check/qwen2_vl-2b.json test-artifacts/gpu-check/llava-7b-igos.json \
		--written-by "make gpu-check" --out docs/results-gpu.md

# Not in `make test`: 10 minutes of mixed requests from 4 clients against the HTTP backend in hosted-like bounds;
# errors, latency percentiles and RSS over time go to docs/soak/ (README.md, rss.html, soak.json).
soak: $(VENV)/.dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m lvlm_interpret.soak --minutes 10 --clients 4 --out docs/soak

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache
