# The two commands a newcomer needs. Both install what is missing first (scripts/bootstrap.sh).
.PHONY: run test test-fast setup bench
VENV ?= .venv

setup:
	@bash scripts/bootstrap.sh

# The main job: a local training run on the `local` preset (cluster/presets/local.yaml) (local Ray, local env servers,
# tiny offline model, MiniWoB click-test). Extra arguments: make run ARGS="--learner.lr 1e-5"
run: setup
	$(VENV)/bin/bgrpo train --config local $(ARGS)

# The test suite (what CI runs through .ci/run): every test, the `slow` ones included (pyproject's
# addopts deselects them from a plain `pytest`; the whole suite fits CI's time). The 20 slowest
# tests are listed at the end, so every CI log says where the suite's time goes.
test: setup
	$(VENV)/bin/python -m pytest -q -m "slow or not slow" --durations=20 $(ARGS)

# The suite without the tests marked `slow` (what a plain `pytest` runs).
test-fast: setup
	$(VENV)/bin/python -m pytest -q $(ARGS)
