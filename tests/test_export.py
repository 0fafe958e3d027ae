"""Exporting what the stages train: a QLoRA RL run saves a peft adapter over an untouched 4-bit base,
adapters merge into full checkpoints (model.py merge), and our folders load in plain transformers and
peft, without this repo's code (checked in a subprocess that imports only torch/transformers/peft).

NANOPRISM_PLAIN_PYTHON=/path/to/python runs that subprocess in another environment, e.g. one where
torchvision imports, so AutoProcessor can be checked too (on this machine it is skipped: see there)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import model as models
import rlvr
import sft
from helpers import fake_reward, write_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def rows(dataset):
    """Two real held-out prompts, each with its image (64 px: a multiple of 32, see MEASURED.md)."""
    return data.load_prompts(str(dataset / "val.parquet"))[:2]


def logits_of(m, processor, rows):
    was_training = m.training
    m.eval()
    with torch.no_grad():
        out = m(**data.encode_prompts(rows, processor)).logits  # (B, T, V)
    m.train(was_training)
    return out


# ----------------------------------------------------------------------------- QLoRA RL


@pytest.fixture(scope="module")
def qlora_run(dataset, tmp_path_factory):
    """One GRPO step with --qlora on the tiny model; the policy rlvr.main loads is kept for a look."""
    pytest.importorskip("bitsandbytes")  # its 4-bit kernels run on CPU here
    import bitsandbytes as bnb
    out = tmp_path_factory.mktemp("qlora_rl")
    seen = {}
    load_policy = models.load_policy

    def spy(cfg, device, log=print):
        m, processor, resume_from = load_policy(cfg, device, log)
        seen["model"] = m
        seen["lora_before"] = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        seen["nf4_before"] = {n: mod.weight.detach().clone() for n, mod in m.named_modules()
                              if isinstance(mod, bnb.nn.Linear4bit)}
        return m, processor, resume_from

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_policy", spy)
        mp.setattr(data, "reward", fake_reward)
        rlvr.main(["--model", "tiny", "--data", f"{dataset}/rl_prompts.parquet", "--val_data", f"{dataset}/val.parquet",
                   "--out_dir", str(out), "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "8",
                   "--eval_rows", "0", "--threads", "1", "--steps", "1", "--lr", "1e-3", "--qlora"])
    return out, seen


def test_qlora_rl_step_trains_the_adapter_over_a_frozen_4bit_base(qlora_run):
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    out, seen = qlora_run
    m = seen["model"]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert metrics[-1]["step"] == 1 and metrics[-1]["grad_norm"] > 0
    # only LoRA weights train, and every B moved (zero at init; A gets no gradient while B is 0).
    # Were bitsandbytes to repack the base on CPU, gradients below the top would be lost and only
    # some B would move (4 of 14): see test_qlora_gradients_survive_generation
    trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trained.keys() == seen["lora_before"].keys() and all("lora_" in n for n in trained)
    lora_b = [n for n in trained if "lora_B" in n]
    moved = [n for n in lora_b if not torch.equal(trained[n], seen["lora_before"][n])]
    assert len(moved) == len(lora_b)
    # the base is still nf4 (packed uint8 with its quantisation state), bit for bit as loaded
    nf4 = {n: mod for n, mod in m.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
    assert nf4.keys() == seen["nf4_before"].keys() and len(nf4) == 2 * 7  # 2 layers x (q k v o gate up down)
    for n, mod in nf4.items():
        assert isinstance(mod.weight, bnb.nn.Params4bit) and mod.weight.dtype == torch.uint8
        assert mod.weight.quant_state.quant_type == "nf4" and torch.equal(mod.weight, seen["nf4_before"][n])
    # the saved folder is a peft adapter (plus the processor parts), not a full model
    final = out / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()
    config = json.load(open(final / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == models.resolve_model("tiny")
    saved = load_file(final / "adapter_model.safetensors")
    assert saved.keys() == {n.replace(".default", "") for n in trained}
    assert all(torch.equal(saved[n.replace(".default", "")], p.detach()) for n, p in trained.items())


def test_qlora_gradients_survive_generation(rows):
    """bitsandbytes (0.50) repacks each Linear4bit's nf4 weight for its AVX512-BF16 CPU kernel the first
    time the layer runs in eval mode without gradients, as every generation does; that kernel
    (gemv_4bit) has no backward, so from then on the gradient through the frozen base layers is
    silently dropped and every LoRA gradient below the top is wrong. load_model turns the repacking
    off (`support_avx512bf16_for_cpu = False` on every bnb.nn.Linear4bit)."""
    pytest.importorskip("bitsandbytes")
    m, processor, _ = models.load_model("tiny", CPU, qlora=True, lora_r=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:  # nonzero B: the A matrices get gradients too
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    enc = data.encode_prompts(rows, processor)

    def grads():
        m.train()
        m.zero_grad(set_to_none=True)
        m(**enc).logits[:, -1].logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    before = grads()
    m.eval()
    with torch.no_grad():
        m(**enc)  # what sampling does
    after = grads()
    wrong = [n for n in before if not torch.allclose(before[n], after[n], atol=1e-6, rtol=1e-4)]
    assert not wrong, f"{len(wrong)} of {len(before)} LoRA gradients changed after one no-grad forward"


# ----------------------------------------------------------------------------- merging adapters


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    """A LoRA adapter saved as the stages save it, with random B so that it changes the logits a lot
    (a freshly trained one is nearly a no-op, and a merge test on it would prove little)."""
    m, processor, _ = models.load_model("tiny", CPU, lora=True, lora_r=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    path = str(tmp_path_factory.mktemp("adapter") / "final")
    models.save_pretrained(m, processor, path)
    return path, m, processor


def test_merged_checkpoint_gives_the_adapter_logits_in_plain_transformers(lora_adapter, rows, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    adapter, m, processor = lora_adapter
    merged = str(tmp_path / "merged")
    assert models.merge_adapter(adapter, merged) == merged
    files = set(os.listdir(merged))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", "generation_config.json"} <= files
    assert "adapter_config.json" not in files and not os.path.exists(merged + ".tmp")
    base_keys = load_file(os.path.join(models.resolve_model("tiny"), "model.safetensors")).keys()
    assert load_file(os.path.join(merged, "model.safetensors")).keys() == base_keys  # no lora_ / base_layer names
    plain = AutoModelForImageTextToText.from_pretrained(merged)
    expected = logits_of(m, processor, rows)
    assert torch.allclose(logits_of(plain, processor, rows), expected, atol=1e-5, rtol=0)
    with m.disable_adapter():  # ...and the adapter mattered: the base alone is far off
        assert (logits_of(m, processor, rows) - expected).abs().max() > 1e-2
    # our loader reads the merged folder's processor back as well
    m2, p2, _ = models.load_model(merged, CPU)
    assert torch.allclose(logits_of(m2, p2, rows), expected, atol=1e-5, rtol=0)


def test_merging_a_qlora_adapter_uses_the_full_precision_base(qlora_run, rows, tmp_path):
    """The CLI, on the adapter the QLoRA run saved: the merged weights are fp32 and equal base + B A,
    i.e. the adapter over the unquantised base (merging into nf4 would round to 4 bits)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    adapter = str(qlora_run[0] / "final")
    merged = str(tmp_path / "merged")
    models.main(["merge", "--adapter", adapter, "--out", merged])
    weights = load_file(os.path.join(merged, "model.safetensors"))
    base = load_file(os.path.join(models.resolve_model("tiny"), "model.safetensors"))
    assert weights.keys() == base.keys()
    assert all(w.dtype == torch.float32 and w.shape == base[k].shape for k, w in weights.items())
    ref, processor, _ = models.load_model(adapter, CPU)  # adapter over the fp32 base (no --qlora)
    plain = AutoModelForImageTextToText.from_pretrained(merged)
    assert torch.allclose(logits_of(plain, processor, rows), logits_of(ref, processor, rows), atol=1e-5, rtol=0)


def test_merge_errors_are_one_line(lora_adapter, tmp_path):
    full = models.resolve_model("tiny")
    with pytest.raises(SystemExit, match="not a LoRA adapter folder .*full checkpoint already"):
        models.merge_adapter(full, str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="not found"):
        models.merge_adapter(str(tmp_path / "nope"), str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="must differ"):
        models.merge_adapter(lora_adapter[0], lora_adapter[0])
    assert not os.path.exists(tmp_path / "out")
    for argv in (["merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "out")], []):
        p = subprocess.run([sys.executable, "model.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert len(p.stderr.strip().splitlines()) == 1 and ("adapter_config.json" in p.stderr or "usage" in p.stderr)


# ----------------------------------------------------------------------------- loading without our code

# Runs in a fresh interpreter, cwd outside the repo. Builds the prompt the way a transformers user
# would: the tokenizer's chat template, the image processor, one <|image_pad|> per merged patch.
PLAIN_SCRIPT = r"""
import json, os, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

job = json.load(open(sys.argv[1]))
folder = job["folder"]
tok = AutoTokenizer.from_pretrained(folder)
image_processor = AutoImageProcessor.from_pretrained(folder)
adapter = os.path.exists(os.path.join(folder, "adapter_config.json"))
base = json.load(open(os.path.join(folder, "adapter_config.json")))["base_model_name_or_path"] if adapter else folder
model = AutoModelForImageTextToText.from_pretrained(base)
if adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, folder)
model.eval()
text = tok.apply_chat_template(job["messages"], tokenize=False, add_generation_prompt=True)
image = Image.open(job["image"]).convert("RGB")
vision = image_processor(images=[image], return_tensors="pt")
n_tokens = int(vision["image_grid_thw"][0].prod()) // image_processor.merge_size ** 2
enc = tok([text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens)], return_tensors="pt")
inputs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=vision["pixel_values"],
              image_grid_thw=vision["image_grid_thw"],
              mm_token_type_ids=(enc["input_ids"] == model.config.image_token_id).long())
with torch.no_grad():
    result = {"input_ids": enc["input_ids"], "logits": model(**inputs).logits}
    if adapter:
        with model.disable_adapter():
            result["base_logits"] = model(**inputs).logits
info = {"adapter": adapter, "torch": torch.__version__, "image_processor": type(image_processor).__name__}

# AutoProcessor: the stock Qwen3VLProcessor always builds a video processor, which needs torchvision
try:
    import torchvision
    info["torchvision"] = torchvision.__version__
except Exception as e:  # absent, or a wheel built for another torch (the CUDA wheel beside torch+cpu)
    info["torchvision_error"] = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[-1]
if "torchvision" in info:
    from transformers import AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(folder)
        info["autoprocessor"] = type(processor).__name__
        auto = processor(text=[text], images=[image], return_tensors="pt")
        info["autoprocessor_parts"] = [type(processor.image_processor).__name__,
                                       type(getattr(processor, "video_processor", None)).__name__]
        result["autoprocessor_input_ids"] = auto["input_ids"]
        result["autoprocessor_pixels"] = auto["pixel_values"]
        with torch.no_grad():
            result["autoprocessor_logits"] = model(**auto).logits
    except Exception as e:
        info["autoprocessor_error"] = f"{type(e).__name__}: {e}"
result["pixels"] = vision["pixel_values"]

# nothing of ours was imported: no loaded module's file lies in the repo (outside its venv)
root = os.path.realpath(job["repo"])
files = {name: os.path.realpath(getattr(mod, "__file__", None) or "/") for name, mod in list(sys.modules.items())}
info["ours"] = sorted(name for name, f in files.items()
                      if f.startswith(root + os.sep) and not f.startswith(os.path.join(root, ".venv") + os.sep))
torch.save(result, job["out"])
json.dump(info, open(job["out"] + ".json", "w"))
"""


def typed_messages(messages):
    """Our `<image>` placeholders as the typed content items chat templates take."""
    out = []
    for msg in messages:
        parts = msg["content"].split("<image>")
        items = [{"type": "text", "text": parts[0]}] if parts[0] else []
        for text in parts[1:]:
            items += [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])
        out.append({"role": msg["role"], "content": items})
    return out


def run_plain(folder, row, tmp_path):
    """PLAIN_SCRIPT on `folder` and `row`'s prompt -> (tensors it computed, info)."""
    image = tmp_path / "image.png"
    data.open_image(row["images"][0]).save(image)
    script, job, out = tmp_path / "plain.py", tmp_path / "job.json", str(tmp_path / "plain.pt")
    script.write_text(PLAIN_SCRIPT)
    job.write_text(json.dumps({"folder": folder, "messages": typed_messages(row["messages"]), "image": str(image),
                               "repo": ROOT, "out": out}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = os.environ.get("NANOPRISM_PLAIN_PYTHON", sys.executable)
    p = subprocess.run([python, str(script), str(job)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out, weights_only=True), json.load(open(out + ".json"))


def assert_same_as_ours(folder, rows, got, info):
    """The plain load saw the same prompt, token for token, and gave our loader's logits."""
    assert info["ours"] == []
    m, processor, _ = models.load_model(folder, CPU)
    enc = data.encode_prompts(rows[:1], processor)
    assert torch.equal(got["input_ids"], enc["input_ids"])
    # equal here; 3e-8 apart where torchvision exists (its image processor normalises in another order)
    assert torch.allclose(got["pixels"], enc["pixel_values"], atol=1e-6, rtol=0)
    assert torch.allclose(got["logits"], logits_of(m, processor, rows[:1]), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def sft_checkpoint(dataset, rows, tmp_path_factory):
    """A full checkpoint as sft.py writes it, and what the plain script makes of it."""
    out = tmp_path_factory.mktemp("sft")
    sft.main(["--data", f"{dataset}/sft_public.json,{dataset}/sft_teacher.json", "--val_data", f"{dataset}/val.parquet",
              "--out_dir", str(out), "--steps", "1", "--batch_size", "4", "--micro_batch_size", "4",
              "--eval_every", "0", "--eval_rows", "0", "--threads", "1"])
    folder = str(out / "final")
    return folder, *run_plain(folder, rows[0], tmp_path_factory.mktemp("plain_sft"))


def test_sft_checkpoint_loads_in_plain_transformers(sft_checkpoint, rows):
    folder, got, info = sft_checkpoint
    assert "model.safetensors" in os.listdir(folder) and not info["adapter"]
    assert_same_as_ours(folder, rows, got, info)


@pytest.fixture(scope="module")
def lora_plain(lora_adapter, rows, tmp_path_factory):
    """The LoRA adapter folder, and what the plain script (peft over the plain base) makes of it."""
    return lora_adapter[0], *run_plain(lora_adapter[0], rows[0], tmp_path_factory.mktemp("plain_lora"))


def test_lora_adapter_loads_in_plain_peft(lora_plain, rows):
    folder, got, info = lora_plain
    assert info["adapter"]
    assert_same_as_ours(folder, rows, got, info)
    assert (got["logits"] - got["base_logits"]).abs().max() > 1e-2  # the adapter was applied


@pytest.mark.parametrize("saved", ["sft_checkpoint", "lora_plain"])
def test_autoprocessor_loads_our_folders(saved, request):
    """Where torchvision imports, AutoProcessor builds the stock Qwen3VLProcessor from our folder and
    encodes the prompt exactly as the tokenizer + image processor do. Here it skips: torchvision is
    not installed, and the PyPI wheel matching torch 2.13 (0.28.0) is built against CUDA torch and
    fails to import beside torch+cpu (its _C.so needs libtorch_cuda.so / libc10_cuda.so)."""
    _, got, info = request.getfixturevalue(saved)
    if "torchvision_error" in info:
        why = ("is not installed (the PyPI wheel for torch 2.13, torchvision 0.28.0, links CUDA torch's libraries "
               "and fails beside torch+cpu)" if info["torchvision_error"].startswith("ModuleNotFoundError")
               else f"does not import ({info['torchvision_error']})")
        pytest.skip(f"AutoProcessor needs torchvision, which {why} with torch {info['torch']}; "
                    "NANOPRISM_PLAIN_PYTHON can name a Python where it imports")
    assert "autoprocessor_error" not in info, info["autoprocessor_error"]
    assert info["autoprocessor"] == "Qwen3VLProcessor"
    assert torch.equal(got["autoprocessor_input_ids"], got["input_ids"])
    assert torch.equal(got["autoprocessor_pixels"], got["pixels"])
    assert torch.allclose(got["autoprocessor_logits"], got["logits"], atol=1e-5, rtol=0)
