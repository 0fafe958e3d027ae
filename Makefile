# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo test data clean

setup: $(STAMP)

# Reinstall only when requirements.txt changes. torch==2.13.0 is the CPU wheel on the CPU machines
# this project is developed on; on a GPU machine pip picks the CUDA build of the same version.
$(STAMP): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	touch $(STAMP)

data: setup
	$(PY) task.py --out data/tiny --seed 0

# The main job on the embedded default. Today: synthetic data -> SFT -> held-out table.
demo: setup
	$(PY) task.py --out data/tiny --seed 0
	$(PY) sft.py --out_dir runs/sft

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data cache .pytest_cache
