"""The real-vocabulary Qwen3-VL stand-in (proxy.py): the facts it promises, checked from the
token strings and the Qwen3-VL numbers rather than from the functions under test, and every
stage one step on it (bench/gpu_smoke.py's CPU dry run)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import model as models
import rollout
from helpers import ROOT

# the ids of the released Qwen3 / Qwen3-VL tokenizers
REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
            "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<think>": 151667,
            "</think>": 151668}


@pytest.fixture(scope="module")
def proxy():
    path = models.resolve_model("proxy")
    torch.manual_seed(0)
    m, processor, _ = models.load_model("proxy", torch.device("cpu"))
    return path, m, processor


def test_real_special_token_ids_and_ordinary_think_tags(proxy):
    path, m, processor = proxy
    tok = processor.tokenizer
    assert {t: tok.convert_tokens_to_ids(t) for t in REAL_IDS} == REAL_IDS
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645
    assert m.config.text_config.vocab_size == 151936 and m.config.image_token_id == 151655
    ids = tok("<caption>- a</caption><think>x</think><answer>1</answer><|im_end|>")["input_ids"]
    assert ids[-1] == 151645 and 151667 in ids and 151668 in ids
    # skip_special_tokens drops <|im_end|> but keeps the think tags (they are ordinary tokens)
    assert tok.decode(ids, skip_special_tokens=True) == (
        "<caption>- a</caption><think>x</think><answer>1</answer>")
    # sampling suppresses exactly the vision tokens, named by their strings
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
             "<|video_pad|>"]
    assert sorted(models.vision_token_ids(tok)) == sorted(REAL_IDS[n] for n in names)


def test_template_only_in_chat_template_json_like_the_hub_folders(proxy, tmp_path):
    path, _, processor = proxy
    assert "chat_template" not in json.load(open(os.path.join(path, "tokenizer_config.json")))
    assert not os.path.exists(os.path.join(path, "chat_template.jinja"))
    text = processor.tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "How many?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    "<|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n")
    # a folder with no template anywhere: a one-line error naming the folder
    bare = tmp_path / "bare"
    shutil.copytree(path, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    os.remove(bare / "chat_template.json")
    with pytest.raises(SystemExit, match="has no chat template"):
        models.load_processor(str(bare))


def test_template_in_tokenizer_config_still_loads(tmp_path):
    """The other layout (ours, and older folders): the template inside tokenizer_config.json."""
    path = models.resolve_model("tiny")
    assert not os.path.exists(os.path.join(path, "chat_template.json"))
    tok = models.load_processor(path).tokenizer
    assert tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)


def test_qwen3_vl_image_preprocessing_and_mrope(proxy):
    _, m, processor = proxy
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size) == (16, 2) and list(ip.image_mean) == [0.5] * 3
    # 96 px is below the 256 x 256 pixel minimum: scaled up to 16 x 16 patches (64 tokens); a
    # 160 x 96 image keeps its aspect ratio; both in one batch
    images = [Image.new("RGB", (96, 96)), Image.new("RGB", (160, 96))]
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"] * 2, images=images,
                    padding=True, return_tensors="pt")
    grid = enc["image_grid_thw"].tolist()
    assert grid[0] == [1, 16, 16] and grid[1][1] * grid[1][2] * 256 >= 65536
    assert grid[1][2] > grid[1][1]  # wider than tall
    text = m.config.text_config
    assert text.head_dim == 128 and text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert text.rope_parameters["mrope_interleaved"]
    # the prompt positions rollout uses: text after an image continues from the image's largest
    # position (its grid side / merge), not from its token count
    pos, first = rollout._prompt_positions(m, enc)
    assert first.tolist()[0] == 1 + 16 // 2 + 1  # vision_start, the 8 x 8 image, vision_end


def test_every_stage_runs_a_step_on_the_proxy(tmp_path):
    """bench/gpu_smoke.py --cpu: sft, warm-up, align, rlvr, evaluate on the proxy in one process
    each, and a 2-process FSDP alignment, on images of three sizes."""
    p = subprocess.run(["timeout", "600", sys.executable, "bench/gpu_smoke.py", "--cpu",
                        "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert p.stdout.count("| ok |") == 6, p.stdout
