"""The embedded model: deterministic build, processor without torchvision, save/reload, options."""
import os

import pytest
import torch
from PIL import Image

import model as models
from helpers import VISION_TOKENS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    path = models.build_embedded("tiny", seed=0, cache_dir=cache)
    m, processor, _ = models.load_model(path, torch.device("cpu"))
    return path, m, processor


def prompt_batch(processor, n=2):
    tok = processor.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>How many red circles are there?"}],
        tokenize=False, add_generation_prompt=True)
    images = [Image.new("RGB", (96, 96), c) for c in ["white", "red"][:n]]
    return processor(text=[text] * n, images=images, padding=True, padding_side="left", return_tensors="pt")


def test_build_is_deterministic_and_cached(tiny, tmp_path):
    path, m, processor = tiny
    again = models.build_embedded("tiny", seed=0, cache_dir=str(tmp_path))
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(os.path.join(path, "tokenizer.json")).read() == open(os.path.join(again, "tokenizer.json")).read()
    # a second call reuses the folder instead of rebuilding
    mtime = os.path.getmtime(os.path.join(again, "config.json"))
    assert models.build_embedded("tiny", seed=0, cache_dir=str(tmp_path)) == again
    assert os.path.getmtime(os.path.join(again, "config.json")) == mtime
    other = models.build_embedded("tiny", seed=1, cache_dir=str(tmp_path))
    assert not torch.equal(load_file(os.path.join(other, "model.safetensors"))["lm_head.weight"] if "lm_head.weight" in a
                           else load_file(os.path.join(other, "model.safetensors"))["model.language_model.embed_tokens.weight"],
                           a.get("lm_head.weight", a["model.language_model.embed_tokens.weight"]))


def test_tiny_shape_and_tokenizer(tiny):
    path, m, processor = tiny
    total, trainable = models.count_params(m)
    assert 0.5e6 < total < 1.5e6
    # vision tower and projector frozen by default
    assert not any(p.requires_grad for p in m.model.visual.parameters())
    tok = processor.tokenizer
    for t in models.TAG_TOKENS + ["<|im_start|>", "<|im_end|>", "<|image_pad|>"]:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert tok.eos_token == "<|im_end|>"
    enc = prompt_batch(processor)
    # 96 px, patch 8 -> 12 x 12 patches, merged 2 x 2 -> 36 image tokens per image
    assert enc["image_grid_thw"].tolist() == [[1, 12, 12], [1, 12, 12]]
    assert (enc["input_ids"] == m.config.image_token_id).sum().item() == 72
    assert torch.equal(enc["mm_token_type_ids"].bool(), enc["input_ids"] == m.config.image_token_id)


def test_save_then_reload_gives_identical_logits(tiny, tmp_path):
    path, m, processor = tiny
    enc = prompt_batch(processor)
    with torch.no_grad():
        before = m(**enc).logits
    models.save_pretrained(m, processor, str(tmp_path / "ckpt"))
    m2, p2, _ = models.load_model(str(tmp_path / "ckpt"), torch.device("cpu"))
    with torch.no_grad():
        after = m2(**prompt_batch(p2)).logits
    assert torch.equal(before, after)
    # the folder is a plain Qwen3-VL folder: transformers loads it without our code
    from transformers import AutoModelForImageTextToText
    plain = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(plain(**enc).logits, before)


def test_generation_never_samples_vision_tokens(tiny):
    path, m, processor = tiny
    torch.manual_seed(0)
    enc = prompt_batch(processor)
    out = m.generate(**enc, max_new_tokens=64, do_sample=True, temperature=1.5, top_k=0,
                     suppress_tokens=models.vision_token_ids(processor.tokenizer))
    new = out[:, enc["input_ids"].shape[1]:]
    # the ids from the tokens' names, not from the function under test (which could return too few)
    vision = torch.tensor(processor.tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    assert not torch.isin(new, vision).any()


def test_lora_trains_only_adapters(tiny):
    path, _, _ = tiny
    m, _, _ = models.load_model(path, torch.device("cpu"), lora=True, lora_r=4)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all("language_model" in n for n in names)


def test_flash_attention_missing_is_a_clear_error(tiny):
    import importlib.util
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(SystemExit, match="flash-attn"):
        models.load_model(tiny[0], torch.device("cpu"), attn="flash_attention_2")


def test_aliases_and_unknown_model():
    assert models.resolve_model("Qwen3-VL-4B") == "Qwen/Qwen3-VL-4B-Instruct"
    with pytest.raises(SystemExit, match="not found"):
        models.load_model("/nonexistent/folder", torch.device("cpu"))


def test_qlora_quantises_the_language_model_only_and_trains_adapters(tiny):
    """bitsandbytes 4-bit runs on CPU here, so the QLoRA path is exercised for real."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    path, _, processor = tiny
    m, _, _ = models.load_model(path, torch.device("cpu"), qlora=True, lora_r=4)
    quantised = [n for n, mod in m.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert quantised and all("language_model" in n for n in quantised)
    assert not any(isinstance(mod, bnb.nn.Linear4bit) for mod in m.base_model.model.model.visual.modules())
    enc = prompt_batch(processor)
    logits = m(**enc).logits
    logits[:, -1].logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_concurrent_builds_on_a_cold_cache_agree(tmp_path):
    """torchrun ranks all build the embedded model when the cache is empty; none may crash."""
    import subprocess
    import sys
    code = "import model; print(model.build_embedded('tiny', cache_dir=%r))" % str(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(models.__file__),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert outs[0][0] == outs[1][0]
    assert [d for d in os.listdir(tmp_path) if ".tmp" in d] == []
