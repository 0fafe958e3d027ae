"""Rollouts: the recorded sampling log-probs equal the re-scored ones, masks and chunking are right,
vision tokens are never sampled (their ids looked up from their names here, not by the code under
test) and pass rates come out right on a stand-in policy whose rates are known."""
import zlib

import pytest
import torch

import data
import model as models
import rollout
from helpers import VISION_TOKENS, write_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = write_task(tmp_path_factory.mktemp("data"), image_size=None, n_rl=6)
    torch.manual_seed(0)
    m, processor, _ = models.load_model("tiny", torch.device("cpu"), train_vision=True)
    return m, processor, data.load_prompts(str(out / "rl_prompts.parquet"))


def recomputed(m, r, temperature=1.0):
    with torch.no_grad():
        return rollout.completion_logprobs(m, r, torch.arange(len(r)), temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_match_sampling(setup, temperature):
    m, processor, rows = setup
    torch.manual_seed(1)
    # prompts of different lengths (left padding) and a budget that forces three prefill chunks
    r = rollout.sample(m, processor, rows[:3], n=4, max_new_tokens=24, temperature=temperature,
                       token_budget=4 * 200)
    assert len(r) == 12 and r.ids.shape[0] == 12 and r.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    lp = recomputed(m, r, temperature)
    diff = ((lp - r.logp) * r.mask).abs().max().item()
    assert diff < 1e-4, diff
    assert r.mask.sum() > 0


def test_masks_stop_at_eos_and_never_sample_vision_tokens(setup):
    m, processor, rows = setup
    torch.manual_seed(2)
    r = rollout.sample(m, processor, rows[:2], n=8, max_new_tokens=40)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    vision = set(tok.convert_tokens_to_ids(VISION_TOKENS))
    assert tok.unk_token_id not in vision and len(vision) == 4  # every name is in the vocabulary
    assert vision <= set(r.blocked)  # the policy leaves them all out, in sampling and re-scoring
    for i in range(len(r)):
        n = int(r.lengths[i])
        assert r.mask[i, :n].all() and not r.mask[i, n:].any()  # mask is a prefix
        valid = r.ids[i, :n].tolist()
        assert eos not in valid[:-1]  # nothing is sampled after the EOS
        assert (valid[-1] == eos) != bool(r.truncated[i]) or n == r.ids.shape[1]
        assert not set(valid) & vision
        assert (r.logp[i, n:] == 0).all()


def test_same_seed_same_rollouts_and_top_p(setup):
    m, processor, rows = setup
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(rollout.sample(m, processor, rows[:2], n=3, max_new_tokens=16, top_p=0.5))
    assert torch.equal(outs[0].ids, outs[1].ids)
    # top_p 0.5 keeps few tokens: the recorded log-prob is still the full distribution's
    lp = recomputed(m, outs[0])
    assert ((lp - outs[0].logp) * outs[0].mask).abs().max() < 1e-4


def test_logprobs_have_gradients_and_micro_batches_cover_everything(setup):
    m, processor, rows = setup
    torch.manual_seed(4)
    r = rollout.sample(m, processor, rows[:2], n=3, max_new_tokens=8)
    budget = 2 * (r.prompt["input_ids"].shape[1] + 8)
    chunks = [c for c, real in rollout.micro_batches(torch.arange(len(r)), r, budget) if real]
    assert torch.cat(chunks).tolist() == list(range(6)) and all(len(c) <= 2 for c in chunks)
    lp = rollout.completion_logprobs(m, r, chunks[1])
    (lp * r.mask[chunks[1]]).sum().backward()
    grads = [p.grad for p in m.model.visual.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # the image features are in the graph
    m.zero_grad()


def test_pass_rates_of_a_policy_with_known_rates(setup, monkeypatch):
    """A stand-in reward makes the pass rates known: prompt 0 always passes, prompt 1 never, and
    the others pass with probability 1/4 (a hash of the response, whose texts all differ). The
    estimates must be 1, 0 and about 1/4, in the prompts' order, also across batches."""
    m, processor, rows = setup
    rows = [dict(rows[0], ground_truth="always"), dict(rows[1], ground_truth="never")] + rows[2:6]

    def reward(text, truth):
        acc = {"always": 1.0, "never": 0.0}.get(truth, float(zlib.crc32(text.encode()) % 4 == 0))
        return dict(score=acc, acc=acc, format=1.0)
    monkeypatch.setattr(data, "reward", reward)
    torch.manual_seed(5)
    rates = rollout.pass_rates(m, processor, rows, n=16, max_new_tokens=8, batch=4)
    assert len(rates) == 6 and rates[:2] == [1.0, 0.0]
    assert 0.05 < sum(rates[2:]) / 4 < 0.5, rates


def test_shared_prefix_gives_the_plain_forwards_gradient(setup):
    m, processor, rows = setup
    torch.manual_seed(6)
    r = rollout.sample(m, processor, rows[:2], n=3, max_new_tokens=10)
    grads = []
    for share in (True, False):
        m.zero_grad()
        lp = rollout.completion_logprobs(m, r, torch.tensor([0, 4, 1, 5]), share_prefix=share)
        (lp * r.mask[[0, 4, 1, 5]] * torch.tensor([[1.0], [-2.0], [0.5], [3.0]])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("visual" in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n
    m.zero_grad()


def test_sampler_draws_from_the_tempered_distribution_and_never_a_masked_token():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0]]).repeat(40000, 1)  # (b, V)
    token, lp = rollout._sample_token(logits, temperature=0.5, top_p=1.0)
    expected = torch.softmax(logits[0] / 0.5, -1)  # token 2 has probability 0
    freq = torch.bincount(token[:, 0], minlength=5).float() / len(token)
    assert freq[2] == 0 and (freq - expected).abs().max() < 0.01
    assert torch.allclose(lp, expected.log()[token[:, 0]])  # the full tempered log-prob is recorded
    token, _ = rollout._sample_token(logits, temperature=1.0, top_p=0.5)  # nucleus: only the top token
    assert (token == 0).all()
