"""memory.py: parameter counts on the meta device equal the real models', the activation formula
equals what autograd keeps in the real layers, and the documented recipes fit (or do not)."""
import json
import re

import pytest
import torch

import common
import discriminator
import memory
import model as models

# The recipes of docs/scaling.md: (a) one 24 GB GPU, (b) and (c) 8 x 80 GB with FSDP
ALIGN_24GB = ("--model Qwen3-VL-4B --stage align --gpus 1 --gpu_gb 24 --qlora --grad_ckpt "
              "--disc Qwen3-VL-2B --disc_4bit --disc_train lora --disc_chunk 1 --disc_grad_ckpt "
              "--disc_micro_batch 4 --max_prompt_len 1024 --max_new_tokens 1024 "
              "--max_pixels 409600 --token_budget 2048 --eval_batch_size 4")
FSDP = "--model Qwen3-VL-4B --gpus 8 --gpu_gb 80 --dist fsdp --grad_ckpt"
ALIGN_8X80 = (FSDP + " --stage align --disc_chunk 1 --disc_grad_ckpt --disc_micro_batch 4 "
              "--token_budget 8192 --eval_batch_size 16")
RLVR_8X80 = FSDP + " --stage rlvr --token_budget 10240 --eval_batch_size 16"
SFT_8X80 = FSDP + " --stage sft --micro_batch_size 1 --eval_batch_size 1"


def run(capsys, flags):
    """`python model.py memory <flags>` in-process -> printed lines."""
    assert models.main(["memory"] + flags.split()) is None  # returns normally: exit status 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("flags", [ALIGN_24GB, ALIGN_8X80, RLVR_8X80, SFT_8X80])
def test_documented_recipes_fit(capsys, flags):
    lines = run(capsys, flags)
    assert re.fullmatch(r"fits: yes \(peak \d+\.\d GB of (24|80)\)", lines[-1])
    assert any(x.startswith("assumption: ") for x in lines)


def test_what_cannot_fit_says_no(capsys):
    # a full fine-tune of the 8B model on one 24 GB GPU: its bf16 weights alone take 17.5 GB
    lines = run(capsys, "--model Qwen3-VL-8B --stage sft --gpus 1 --gpu_gb 24 --dist ddp "
                        "--micro_batch_size 1 --grad_ckpt --eval_batch_size 1")
    assert lines[-1].startswith("fits: no (peak ")


def test_json_numbers_add_up(capsys):
    est = json.loads("\n".join(run(capsys, ALIGN_8X80 + " --json")))
    assert est["peak"] == pytest.approx(est["overhead"] + est["kept"] + max(est["phases"].values()))
    by_phase = {}
    for phase, _, n in est["rows"]:
        by_phase[phase] = by_phase.get(phase, 0) + n
    assert by_phase.pop("kept all run") == pytest.approx(est["kept"])
    assert by_phase == pytest.approx(est["phases"])
    # FSDP over 8: the policy's fp32 shards are an eighth of 4 bytes per parameter
    assert est["rows"][0][2] == pytest.approx(4 * 4_437_815_808 / 8)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(SystemExit):
        memory.main(["--no_such_flag"])
    with pytest.raises(SystemExit, match="qlora cannot be combined"):
        memory.main(["--qlora", "--gpus", "2", "--dist", "fsdp"])
    with pytest.raises(SystemExit, match="image tokens"):
        memory.main(["--max_pixels", "100000000"])


def test_public_configs_give_the_published_sizes():
    # published: 4B 4,437,815,808 (the released weights' per-tensor total), 8B 8.77B, 2B 2.13B
    for name, total in (("Qwen3-VL-4B", 4.4378e9), ("Qwen3-VL-8B", 8.77e9),
                        ("Qwen3-VL-2B", 2.128e9)):
        m = memory.build_meta(memory.hf_config(name)[0])
        assert sum(p.numel() for p in m.parameters()) == pytest.approx(total, rel=0.02)
    pp = memory.policy_params(memory.build_meta(memory.hf_config("Qwen3-VL-4B")[0]),
                              common.parse_config(memory.MemoryConfig, []))
    assert pp["total"] == 4_437_815_808 and pp["lora"] == 33_030_144  # r = 16 on 7 x 36 linears


@pytest.fixture(scope="module")
def tiny():
    return models.resolve_model("tiny")  # the embedded preset, built once and cached


def test_meta_counts_equal_the_built_models(tiny):
    cfg = common.parse_config(memory.MemoryConfig, ["--model", "tiny", "--disc", "tiny"])
    config, source = memory.hf_config("tiny")
    assert source.endswith("config.json")
    pp = memory.policy_params(memory.build_meta(config), cfg)
    real, _, _ = models.load_model(tiny, torch.device("cpu"))
    assert pp["total"] == sum(p.numel() for p in real.parameters())
    visual = sum(p.numel() for p in real.model.visual.parameters())
    assert pp["vision tower"] + pp["merger"] == visual
    lora, _, _ = models.load_model(tiny, torch.device("cpu"), lora=True, lora_r=cfg.lora_r)
    assert pp["lora"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    dp = memory.disc_params(memory.build_disc_meta(config, cfg), cfg)
    disc, _ = discriminator.build(tiny)
    assert dp["total"] == sum(p.numel() for p in disc.parameters())
    experts = [p for m in disc.moe_layers() for p in m.experts.parameters()]
    assert dp["experts"] == sum(p.numel() for p in experts)


def saved_bytes(layer, hidden, lm, params):
    """Bytes autograd keeps for one decoder layer's backward: every saved tensor's storage once,
    the parameters and the shared inputs (rotary tables, boolean mask) excluded."""
    T = hidden.shape[1]
    pos = torch.arange(T)[None, None].expand(3, 1, T)
    cos, sin = lm.rotary_emb(hidden, pos)
    mask = torch.ones(1, 1, T, T, dtype=torch.bool).tril()
    skip = {p.untyped_storage().data_ptr() for p in list(params) + [cos, sin, mask]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, position_embeddings=(cos, sin), attention_mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("how", ["full", "lora", "qlora"])
def test_layer_bytes_are_what_autograd_keeps(tiny, how):
    """The per-token formula against the saved tensors of a real decoder layer as load_model builds
    it: bf16 full fine-tune, bf16 + LoRA, and QLoRA (nf4 base, peft's fp32 stream)."""
    if how == "qlora":
        pytest.importorskip("bitsandbytes")
    m, _, _ = models.load_model(tiny, torch.device("cpu"), dtype="bf16", lora=how == "lora",
                                qlora=how == "qlora")
    lm = models.hf_model(m).model.language_model
    a, T = (4 if how == "qlora" else 2), 48
    dtype = torch.float32 if a == 4 else torch.bfloat16
    hidden = torch.randn(1, T, lm.config.hidden_size, dtype=dtype, requires_grad=True)
    got = saved_bytes(lm.layers[0], hidden, lm, m.parameters())
    s = memory.shape(models.hf_model(m).config)
    per_q, per_k = memory.layer_bytes(s, a, train=how == "full", lora_r=16 if how != "full" else 0)
    assert got == T * per_q + T * per_k + a * T * T  # + the mask bias sdpa keeps


@pytest.mark.parametrize("trains", ["full", "experts"])
def test_moe_layer_bytes_are_what_autograd_keeps(tiny, trains):
    """The same for the discriminator's upcycled MoE layer: all of it trained, or only the
    experts, routers and value head (the frozen attention still passes gradients through)."""
    disc, _ = discriminator.build(tiny, dtype="bf16")
    if trains == "experts":
        for name, p in disc.named_parameters():
            p.requires_grad_(bool(re.search(r"experts|router|value_head", name)))
    lm = disc.backbone.language_model
    T = 48
    hidden = torch.randn(1, T, lm.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    got = saved_bytes(lm.layers[0], hidden, lm, disc.parameters())
    per_q, per_k = memory.layer_bytes(memory.shape(disc.backbone.config), 2,
                                      train=trains == "full", moe=(4, 2, True, True, 0))
    assert got == T * per_q + T * per_k + 2 * T * T
