"""The discriminator on the tiny model: last-token scores, sparse upcycling, the load-balancing loss,
segment routing, the three kinds, the score guard, save/load, and the warm-up command."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import discriminator as D
import model as models
import task
import warmup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on this shared 2-core machine a second OpenMP thread competing with another job made
    a forward 30x slower (spinning threads), not 2x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    task.write_dataset(str(out), seed=0, n_sft_public=2, n_sft_teacher=2, n_align=24, n_rl=2, n_val=2, n_test=2)
    return out


@pytest.fixture(scope="module")
def rows(dataset):
    return data.load_prompts(str(dataset / "align_prompts.parquet"), require_teacher=True)


@pytest.fixture(scope="module")
def disc(rows):
    d, processor = D.build("tiny")
    return d.eval(), processor


def scores(d, processor, prompts, segments, which="cap"):
    with torch.no_grad():
        return D.score(d, processor, prompts, segments, which)[0]


def test_score_is_read_at_the_last_valid_token_whatever_the_padding(disc, rows):
    d, processor = disc
    long, short = rows[0]["teacher_cot"], "<think>ok</think><answer>1</answer>"
    both = scores(d, processor, [rows[0], rows[1]], [long, short], "cot")
    alone = torch.cat([scores(d, processor, [rows[0]], [long], "cot"), scores(d, processor, [rows[1]], [short], "cot")])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)
    # extra right padding appended by hand: still the same scores
    batch, _ = D.encode(processor, [rows[0], rows[1]], [long, short])
    pad = torch.full((2, 7), processor.tokenizer.pad_token_id)
    batch["input_ids"] = torch.cat([batch["input_ids"], pad], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros_like(pad)], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(pad)], 1)
    with torch.no_grad():
        padded, _ = d(batch, "cot")
    torch.testing.assert_close(padded, both, atol=1e-5, rtol=0)
    assert batch["segment_start"][1] < batch["attention_mask"][1].sum()  # the segment follows the prompt


def test_upcycling_without_noise_reproduces_the_dense_model(disc, rows):
    _, processor = disc
    vlm, _, _ = models.load_model("tiny", CPU, train_vision=True)
    batch, _ = D.encode(processor, rows[:2], [rows[0]["teacher_caption"], rows[1]["teacher_caption"]])
    batch.pop("segment_start")
    with torch.no_grad():
        dense = vlm.model(**batch).last_hidden_state
        D.upcycle(vlm.model.language_model, n_experts=4, top_k=2, noise=0.0)
        moe = vlm.model(**batch).last_hidden_state
    # identical experts, top-k weights summing to 1: sum_k w_k * MLP(x) = MLP(x)
    torch.testing.assert_close(moe, dense, atol=1e-5, rtol=1e-5)
    assert isinstance(vlm.model.language_model.layers[0].mlp, D.MoEMLP)


def test_load_balancing_loss_by_hand():
    E = 4
    uniform = torch.full((4, E), 0.25)
    spread = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    aux, load = D.load_balancing_loss(uniform, spread, E)
    assert aux.item() == pytest.approx(1.0) and load.tolist() == [0.25] * 4  # 4 * sum(1/4 * 1/4)
    # uniform probabilities give 1.0 whatever the choice: sum_e f_e = 1
    assert D.load_balancing_loss(uniform, torch.tensor([[0, 1]] * 4), E)[0].item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 4)
    # top-2: f = (1/2, 1/2, 0, 0), P = (1, 0, 0, 0) -> 4 * 1/2 = 2 = E / k; top-1: f = P = e_0 -> E
    assert D.load_balancing_loss(collapsed, torch.tensor([[0, 1]] * 4), E)[0].item() == pytest.approx(2.0)
    assert D.load_balancing_loss(collapsed, torch.tensor([[0]] * 4), E)[0].item() == pytest.approx(4.0)


def test_moe_layer_aux_loss_and_padding_mask():
    """The same numbers from the layer: a zero router is uniform, a router that loves expert 0 collapses."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextMLP

    class Cfg:
        hidden_size, intermediate_size, hidden_act = 8, 16, "silu"
    moe = D.MoEMLP(Qwen3VLTextMLP(Cfg), n_experts=4, top_k=2, noise=0.01)
    x = torch.rand(2, 5, 8) + 0.1  # positive, so a positive router row wins everywhere
    with torch.no_grad():
        moe.router.weight.zero_()
        moe(x)
        assert moe.balance()[0].item() == pytest.approx(1.0)
        moe.router.weight[0] = 100.0
        moe(x)
        aux, load = moe.balance()
        assert aux.item() == pytest.approx(2.0)  # E / k
        assert load.tolist()[0] == pytest.approx(0.5)
        # padding tokens are left out of the loss: route the pad positions elsewhere, nothing changes
        token_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        x[0, 3:] = -x[0, 3:]  # these now prefer other experts, but they are padding
        moe(x)
        assert moe.balance(token_mask)[0].item() == pytest.approx(2.0)
        assert moe.balance()[0].item() != pytest.approx(2.0)
        assert moe.chosen.shape == (2, 5, 2)


def test_segment_routing_keeps_each_segment_on_its_experts(rows):
    d, processor = D.build("tiny", routing="segment")
    for which, group in (("cap", {0, 1}), ("cot", {2, 3})):
        key = "teacher_caption" if which == "cap" else "teacher_cot"
        batch, _ = D.encode(processor, rows[:3], [r[key] for r in rows[:3]])
        with torch.no_grad():
            d(batch, which)
        mask = batch["attention_mask"].bool()
        segment = (torch.arange(mask.shape[1])[None] >= batch["segment_start"][:, None]) & mask  # (B, T)
        prompt = mask & ~segment
        for m in d.moe_layers():
            assert set(m.chosen[segment].unique().tolist()) == group
            assert set(m.chosen[prompt].unique().tolist()) == {0, 1, 2, 3}  # the prompt routes freely
    with pytest.raises(ValueError, match="segment routing"):
        D.build("tiny", routing="segment", top_k=3)


def test_each_kind_builds_and_scores(rows):
    other = {**rows[0], "images": rows[1]["images"]}  # same question and answer, another image
    segment = rows[0]["teacher_caption"]
    for kind in D.KINDS:
        d, processor = D.build("tiny", kind=kind)
        s = scores(d, processor, [rows[0], other], [segment, segment])
        assert s.shape == (2,) and torch.isfinite(s).all()
        if kind == "text-only":  # never sees the image: both rows are the same text
            assert s[0].item() == pytest.approx(s[1].item(), abs=1e-6)
            assert not any(p.requires_grad for p in d.backbone.visual.parameters())
        else:
            assert abs(s[0].item() - s[1].item()) > 1e-6
        assert (len(d.moe_layers()) == 0) == (kind == "dense")
        with torch.enable_grad():  # scores carry gradient, and the aux loss too for MoE kinds
            s, aux = D.score(d, processor, rows[:2], [segment, segment], "cap")
        assert s.requires_grad and (aux.requires_grad or kind == "dense")


def test_score_guard(disc, rows):
    raw = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6, -1e6, 3.0])
    assert D.guard(raw).tolist() == [0.0, 0.0, 0.0, 10.0, -10.0, 3.0]
    d, processor = D.build("tiny")
    with torch.no_grad():
        d.value_head.bias.fill_(float("nan"))
        assert scores(d, processor, rows[:2], ["<caption>a</caption>"] * 2).tolist() == [0.0, 0.0]
        d.value_head.bias.fill_(1e6)
        assert scores(d, processor, rows[:2], ["<caption>a</caption>"] * 2).tolist() == [10.0, 10.0]


def test_save_load_round_trip(tmp_path, rows):
    d, processor = D.build("tiny", routing="segment", kind="moe")
    segments = [r["teacher_cot"] for r in rows[:3]]
    before = scores(d, processor, rows[:3], segments, "cot")
    D.save(d, processor, str(tmp_path / "disc"))
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(tmp_path / "disc"))  # safetensors only
    loaded, loaded_processor = D.load(str(tmp_path / "disc"))
    assert loaded.cfg == d.cfg
    torch.testing.assert_close(scores(loaded.eval(), loaded_processor, rows[:3], segments, "cot"), before, atol=0, rtol=0)


def test_bt_loss_decreases_on_a_fixed_pair_set(rows):
    torch.manual_seed(0)
    d, processor = D.build("tiny", kind="moe")
    pairs = [{"prompt": r["messages"][1]["content"].replace("<image>", "").strip(), "image": r["images"][0],
              "teacher_caption": r["teacher_caption"], "teacher_cot": r["teacher_cot"],
              "student_caption": "<caption>- a picture</caption>",
              "student_cot": "<think>guess</think>\n<answer>0</answer>"} for r in rows[:4]]
    optimizer = torch.optim.AdamW(D.param_groups(d), lr=1e-3)
    first = None
    for _ in range(20):
        loss, record = warmup.pair_loss(d, processor, pairs)
        first = first if first is not None else record
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert record["bt_cap"] < first["bt_cap"] and record["bt_cot"] < first["bt_cot"]
    assert record["acc_cap"] == 1.0 and record["acc_cot"] == 1.0 and record["gap_cot"] > 0


def run_cli(*argv, timeout=240):
    return subprocess.run([sys.executable, "warmup.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_warmup_builds_official_pairs_and_a_loadable_discriminator(dataset, rows, tmp_path, monkeypatch):
    # A random policy never writes a valid answer, so the student here is scripted: every third
    # answer is malformed (skipped and counted), the others are valid but wrong.
    answers = [("no tags at all" if i % 3 == 0 else f"<caption>- a shape</caption><think>one</think><answer>{i}</answer>")
               for i in range(len(rows))]
    monkeypatch.setattr(models, "generate", lambda *a, **k: answers[:len(a[2])])
    out = tmp_path / "warm"
    warmup.main(["--policy", "tiny", "--prompts", str(dataset / "align_prompts.parquet"), "--max_prompts", "12",
            "--out_dir", str(out), "--steps", "2", "--batch_size", "4", "--val_pairs", "2",
                 "--probe_data", ""])
    pairs = [json.loads(line) for line in (out / "warmup_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8  # 12 prompts, 4 malformed answers skipped
    assert set(pairs[0]) == {"prompt", "image", "teacher_caption", "teacher_cot", "student_caption", "student_cot"}
    assert "<image>" not in pairs[0]["prompt"] and not os.path.isabs(pairs[0]["image"])
    assert pairs[0]["student_caption"] == "<caption>- a shape</caption>"
    assert data.load_pairs(str(out / "warmup_pairs.jsonl"))  # the official loader reads it back
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 2] and "val_acc_cap" in metrics[-1]
    assert {"loss", "acc_cap", "acc_cot", "gap_cap", "gap_cot", "load_cap", "aux"} <= set(metrics[0])
    loaded, _ = D.load(str(out / "final"))
    assert loaded.cfg["kind"] == "moe" and loaded.cfg["n_experts"] == 4

    # the same pairs file through the command line, official-file path, checkpointed as on a real backbone
    p = run_cli("--pairs", str(out / "warmup_pairs.jsonl"), "--out_dir", str(tmp_path / "cli"),
                "--steps", "1", "--batch_size", "2", "--val_pairs", "0", "--kind", "dense", "--grad_ckpt")
    assert p.returncode == 0, p.stderr[-2000:]
    assert D.load(str(tmp_path / "cli" / "final"))[0].cfg["kind"] == "dense"


def test_warmup_cli_reports_bad_input_in_one_line(dataset, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "image": "images/missing.png", "teacher_caption": "a",
                               "teacher_cot": "b", "student_caption": "c", "student_cot": "d"}) + "\n")
    p = run_cli("--pairs", str(bad), "--out_dir", str(tmp_path / "out"))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"{bad} row 1: image images/missing.png: missing" in p.stderr
    # a random policy writes no valid answer: a clear error instead of training on nothing
    p = run_cli("--policy", "tiny", "--prompts", str(dataset / "align_prompts.parquet"), "--max_prompts", "8",
                "--max_new_tokens", "8", "--out_dir", str(tmp_path / "out"))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "none of the 8 student answers" in p.stderr


def test_gradient_checkpointing_gives_the_same_gradient(rows):
    """Scores and every gradient of a two-micro-batch, two-segment loss equal with and without
    checkpointing: the recomputation sees exactly the routing the forward used."""
    def grads(ckpt):
        d, processor = D.build("tiny", seed=0)
        if ckpt:
            D.gradient_checkpointing(d)
        d.train()
        caps, aux1 = D.score(d, processor, rows[:3], [r["teacher_caption"] for r in rows[:3]], "cap", micro_batch=2)
        cots, aux2 = D.score(d, processor, rows[:3], [r["teacher_cot"] for r in rows[:3]], "cot", micro_batch=2)
        (caps.sum() - 2 * cots.sum() + aux1 + aux2).backward()
        return torch.cat([caps, cots]).detach(), {n: p.grad for n, p in d.named_parameters() if p.grad is not None}
    plain_scores, plain = grads(False)
    ckpt_scores, ckpt = grads(True)
    torch.testing.assert_close(ckpt_scores, plain_scores)
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)
    seg, _ = D.build("tiny", routing="segment")
    with pytest.raises(SystemExit, match="segment"):
        D.gradient_checkpointing(seg)
