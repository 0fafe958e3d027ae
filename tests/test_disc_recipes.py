"""The discriminator designs for one small GPU (discriminator.build train="lora" / "head",
bits4): what trains, that a warm-up step moves it, that save / load gives the same D, and the
one-GPU alignment recipe of docs/scaling.md end to end on the real-vocabulary proxy (QLoRA
policy, nf4 discriminator with LoRA experts) at toy scale."""
import json

import pytest
import torch

import align
import data
import discriminator
import warmup
from helpers import fake_split_segments, write_task


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"), n_align=4)


def write_pairs(dataset, path):
    """Official-format warm-up pairs: the teacher against its own answer with a wrong count."""
    with open(path, "w") as f:
        for row in data.load_prompts(str(dataset / "align_prompts.parquet")):
            f.write(json.dumps({"prompt": row["extra_info"]["question"], "image": row["images"][0],
                                "teacher_caption": row["teacher_caption"],
                                "teacher_cot": row["teacher_cot"],
                                "student_caption": row["teacher_caption"].replace("1", "2"),
                                "student_cot": row["teacher_cot"].replace("<answer>",
                                                                          "<answer>9")}) + "\n")
    return path


def test_lora_experts_on_a_4bit_backbone_train_save_and_reload(dataset, tmp_path):
    pairs = write_pairs(dataset, tmp_path / "pairs.jsonl")
    out = tmp_path / "warm"
    warmup.main(["--pairs", str(pairs), "--out_dir", str(out), "--steps", "2", "--batch_size", "2",
                 "--val_pairs", "0", "--probe_data", "", "--disc_train", "lora", "--disc_4bit",
                 "--disc_lora_r", "4", "--lr", "1e-2"])
    disc, processor = discriminator.load(str(out / "final"))
    trained = [n for n, p in disc.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or ".router." in n or "value_head" in n for n in trained)
    assert any(type(m).__name__ == "Linear4bit" for m in disc.modules())
    # the warm-up moved the LoRA experts away from their zero init
    assert any(p.abs().sum() > 0 for n, p in disc.named_parameters() if "lora_B" in n)
    fresh, _ = discriminator.build("tiny", train="lora", bits4=True, lora_r=4)
    assert all(p.abs().sum() == 0 for n, p in fresh.named_parameters() if "lora_B" in n)
    # reloading twice gives the same scores: the frozen part is rebuilt exactly
    again, _ = discriminator.load(str(out / "final"))
    rows = data.load_prompts(str(dataset / "align_prompts.parquet"))[:2]
    with torch.no_grad():
        a = discriminator.score(disc, processor, rows, ["<caption>a</caption>"] * 2, "cap")[0]
        b = discriminator.score(again, processor, rows, ["<caption>a</caption>"] * 2, "cap")[0]
    assert torch.equal(a, b)


def test_the_one_gpu_alignment_recipe_runs_on_the_proxy(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "split_segments", fake_split_segments)
    align.main(["--model", "proxy", "--qlora", "--disc", "proxy", "--disc_train", "lora",
                "--disc_4bit", "--disc_chunk", "1", "--grad_ckpt", "--disc_grad_ckpt",
                "--data", f"{dataset}/align_prompts.parquet", "--out_dir", str(tmp_path / "run"),
                "--steps", "1", "--prompts_per_step", "2", "--group_size", "2",
                "--max_new_tokens", "8", "--eval_rows", "0", "--threads", "1"])
    record = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert record["disc_grad_norm"] > 0 and record["grad_norm"] > 0, record
