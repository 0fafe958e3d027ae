# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo test data clean reproduce reproduce-tiny

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

# The main job on the embedded default: PRISM's claim at toy scale. Two arms with the same seed and
# the same RLVR budget, (a) SFT -> GRPO and (b) SFT -> align -> GRPO, then one evaluation of every
# stage on the held-out test split (table in runs/eval/results.md, plots next to it).
demo: setup
	$(PY) task.py --out data/tiny --seed 0
	$(PY) pretrain.py --preset tiny
	$(PY) sft.py --out_dir runs/sft --eval_every 0
	$(PY) rlvr.py --model runs/sft/final --algo grpo --out_dir runs/rl_sft $(RL_FLAGS)
	$(PY) warmup.py --policy runs/sft/final --out_dir runs/disc_warmup --epochs 3 $(WARMUP_FLAGS)
	$(PY) align.py --model runs/sft/final --disc runs/disc_warmup/final --out_dir runs/align $(ALIGN_FLAGS)
	$(PY) evaluate.py --probe runs/align/final/discriminator --data data/tiny/test.parquet
	$(PY) rlvr.py --model runs/align/final --algo grpo --out_dir runs/rl_align $(RL_FLAGS)
	$(PY) evaluate.py --data data/tiny/test.parquet --out_dir runs/eval $(EVAL_FLAGS) \
	    --models base=tiny,sft=runs/sft/final,aligned=runs/align/final,sft-grpo=runs/rl_sft/final,align-grpo=runs/rl_align/final \
	    --align_log runs/align/metrics.jsonl --rl_logs sft-grpo=runs/rl_sft/metrics.jsonl,align-grpo=runs/rl_align/metrics.jsonl

# Settings of the demo's RL and alignment stages (fixed before looking at the test split); the
# stages skip their own held-out evaluation (--eval_rows 0): evaluate.py measures every model at the end.
# pretrain.py builds the pretrained `tiny` base once (cached; ~5 min on an idle 2-core machine).
# --vision trained: the official code trains the policy's vision tower in stages 2-3 (only SFT
# freezes it; discriminator.py's docstring). The discriminator keeps the pretrained tower frozen
# (--vision auto): at our lr 1e-3 (official 1e-5) training it cost the grounding probe 0.13, and
# hard negatives (one object misperceived) are what made it judge content: 3 per sampled pair,
# 552 steps (what 3 epochs of 1 per pair took) gave a probe of 0.835 (docs/results.md).
RL_FLAGS := --steps 300 --eval_rows 0 --vision trained
ALIGN_FLAGS := --steps 150 --eval_rows 0 --vision trained
WARMUP_FLAGS := --hard_negatives 3 --steps 552
EVAL_FLAGS := --k 4

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data cache .pytest_cache

# The longer reproduction: the `small` preset, 3 seeds, both arms, GRPO/DAPO/GSPO and the discriminator
# ablations; resumable (finished stages are skipped). Wall time: docs/results.md.
reproduce: setup
	$(PY) reproduce.py

# A grid that fits a 3-hour session on the 2-core machine (README, "The longer reproduction"): the
# demo's tiny preset and settings (SFT defaults, 150 alignment and 300 RL steps), 3 seeds; the demo's
# comparison (SFT -> GRPO vs SFT -> align -> GRPO) plus the two discriminator ablations' alignments.
# The seeds are independent: `make reproduce-tiny SEEDS=1` in several shells shares the cores.
SEEDS ?= 0,1,2
reproduce-tiny: setup
	$(PY) pretrain.py --preset tiny
	$(PY) reproduce.py --model tiny --seeds $(SEEDS) --out runs/reproduce_tiny --algos grpo \
	    --sft_flags "--eval_every 0" --warmup_flags "$(WARMUP_FLAGS)" --align_flags "$(ALIGN_FLAGS)" \
	    --rl_flags "$(RL_FLAGS)"
