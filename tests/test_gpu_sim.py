"""The CUDA paths, proven without a GPU (none of these machines has one).

Three simulations, each of which fails on a bug that would crash the first GPU run:
- device placement: the model stays on the CPU while torch's default device is `meta`, so a
  tensor that project code creates without `device=` lands on `meta` and any op mixing it with a
  model tensor raises "... is not on the expected device". That is exactly the mistake that breaks
  on CUDA, where such a tensor lands on the CPU beside CUDA activations. Only code outside the
  project runs under the CPU device here: the Hugging Face processor (it builds its tensors on the
  default device by design) and torch's AdamW step (its step counter too).
- collectives: the process group is started with the backend table a GPU run uses, NCCL replaced
  by gloo *for CUDA tensors only*; a collective on a CPU tensor with no CPU backend then fails as
  it would under NCCL.
- FSDP mixed precision: the CUDA policy (bf16 compute) forced on, through the discriminator's
  fp32 value head and through sampling and re-scoring.
"""
import contextlib

import pytest
import torch

import align
import common
import data
import discriminator
import model as models
import rlvr
import rollout
import sft
from helpers import write_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = write_task(tmp_path_factory.mktemp("data"), image_size=None, n_rl=4)
    torch.manual_seed(0)
    m, processor, _ = models.load_model("tiny", torch.device("cpu"))
    rows = data.load_prompts(str(out / "rl_prompts.parquet"))
    # a text-only prompt between image prompts: left padding, no image, different positions
    mixed = [rows[0], discriminator._without_images(rows[1]) | {"ground_truth": "1"}, rows[2]]
    return m, processor, mixed


def _on_cpu(fn):
    def wrapped(*args, **kwargs):
        with torch.device("cpu"):
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def meta_default(processor, optimizer=None):
    """torch's default device is `meta` for the duration, except inside the processor (and the
    optimizer's step): every tensor our code creates must name its device."""
    cls = type(processor)
    call = cls.__call__
    cls.__call__ = _on_cpu(call)
    step = optimizer.step if optimizer else None
    if optimizer:
        optimizer.step = _on_cpu(step)
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
        cls.__call__ = call
        if optimizer:
            optimizer.step = step


def test_meta_default_catches_a_tensor_without_device(setup):
    """The simulation itself: a tensor created without device= meets a model tensor and fails."""
    m, processor, _ = setup
    with meta_default(processor), pytest.raises(RuntimeError, match="device"):
        torch.cat([m.lm_head.weight[:1], torch.ones(1, m.lm_head.weight.shape[1])])


def test_rollout_rescoring_and_scoring_keep_every_tensor_on_the_model_device(setup):
    m, processor, rows = setup
    disc, disc_processor = discriminator.build("tiny")
    with meta_default(processor), meta_default(disc_processor):
        torch.manual_seed(1)
        r = rollout.sample(m, processor, rows, n=2, max_new_tokens=6, token_budget=2 * 2 * 300)
        every = torch.arange(len(r), device="cpu")
        for share in (True, False):  # both re-scoring paths
            rollout.completion_logprobs(m, r, every, share_prefix=share).sum().backward()
        captions = ["<caption>x</caption>"] * 3
        scores, aux = discriminator.score(disc, disc_processor, r.rows, captions, "cap")
        (scores.sum() + aux).backward()
    assert r.mask.sum() > 0 and scores.shape == (3,)


@pytest.fixture
def stages_on_meta_default(monkeypatch):
    """Run whole stages with torch's default device `meta`: loading (a from_pretrained of our
    own files), the processor and AdamW's step run under the CPU device, everything else not."""
    for module, name in ((models, "load_model"), (discriminator, "load"), (discriminator, "build")):
        monkeypatch.setattr(module, name, _on_cpu(getattr(module, name)))
    call = models._image_only_processor_class

    def processor_class():
        cls = call()
        cls.__call__ = _on_cpu(cls.__call__)
        return cls
    monkeypatch.setattr(models, "_image_only_processor_class", processor_class)
    monkeypatch.setattr(torch.optim.AdamW, "step", _on_cpu(torch.optim.AdamW.step))
    torch.set_default_device("meta")
    yield
    torch.set_default_device(None)


@pytest.mark.parametrize("stage", ["sft", "rlvr", "align"])
def test_rl_stages_keep_every_tensor_on_the_model_device(stage, tmp_path, stages_on_meta_default):
    """A whole RL step (rollout, reward or scores, advantage, D's update, the policy update with
    several mini- and micro-batches, held-out evaluation, logging, checkpoint) with no tensor
    left on the default device."""
    out = write_task(tmp_path / "data", n_align=4)
    main = {"sft": sft.main, "rlvr": rlvr.main, "align": align.main}[stage]
    argv = ["--model", "tiny", "--val_data", f"{out}/val.parquet",
            "--out_dir", str(tmp_path / stage),
            "--steps", "1", "--prompts_per_step", "2", "--group_size", "2",
            "--max_new_tokens", "6", "--eval_rows", "2", "--eval_k", "2", "--mini_batches", "2",
            "--token_budget", "200", "--threads", "1"]
    if stage == "sft":  # SFT's own flags
        argv = argv[:6] + ["--steps", "2", "--batch_size", "4", "--micro_batch_size", "2",
                           "--eval_rows", "2", "--max_new_tokens", "6", "--threads", "1",
                           "--data", f"{out}/sft_teacher.json"]
    elif stage == "align":
        argv += ["--disc", "tiny", "--data", f"{out}/align_prompts.parquet", "--disc_chunk", "1"]
    else:
        argv += ["--data", f"{out}/rl_prompts.parquet"]
    main(argv)
    assert (tmp_path / stage / "final").is_dir()
def _simulated(spec):
    """A GPU run's backend spec runnable here: NCCL's place taken by gloo for CUDA tensors only."""
    if spec == "nccl":  # one backend for the group: it would serve CUDA tensors only
        return "cuda:gloo"
    return spec.replace("cuda:nccl", "cuda:gloo")


@contextlib.contextmanager
def process_group(spec):
    """A one-rank process group in this process with the given backend spec."""
    torch.distributed.init_process_group(spec, store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_every_collective_the_stages_issue_works_with_the_gpu_backend():
    """The stages all-reduce CPU bookkeeping tensors (counts, flags, metric sums) beside the GPU
    gradients; the backend a GPU run starts must accept both (common.BACKENDS)."""
    with process_group(_simulated("nccl")), pytest.raises(RuntimeError):
        common.any_rank(True)  # the simulation fails as a plain NCCL group would
    with process_group(_simulated(common.BACKENDS["cuda"])):
        assert common.any_rank(True) and not common.any_rank(False)
        assert common.all_reduce_sum(torch.tensor([1.0, 2.0], device="cpu")).tolist() == [1.0, 2.0]
        assert models.even_split([1, 2]) == ([1, 2], [True, True])
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 2.0)
        common.all_reduce_grads([p], average=True)
        assert p.grad.tolist() == [2.0, 2.0, 2.0]
        assert common.all_gather_list([torch.ones(2, 3, device="cpu")])[0].shape == (2, 3)
        assert common.sum_over_ranks({"a": 1.5})["a"] == 1.5
        common.barrier()


def test_fsdp_bf16_policy_through_the_discriminator_and_the_policy(setup):
    """FSDP2 with the CUDA mixed-precision policy forced on: the discriminator's fp32 value head
    and sampling / re-scoring / the update of a bf16-computing policy."""
    _, processor, rows = setup
    with process_group("gloo"):
        disc, disc_processor = discriminator.build("tiny")
        disc = models.wrap_distributed(disc, torch.device("cpu"), "fsdp", mixed_precision=True)
        scores, aux = discriminator.score(disc, disc_processor, rows, ["<think>1</think>"] * 3,
                                          "cot")
        (scores.sum() + aux).backward()
        assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
        m, processor, _ = models.load_model("tiny", torch.device("cpu"))
        m = models.wrap_distributed(m, torch.device("cpu"), "fsdp", grads="sum",
                                    mixed_precision=True)
        torch.manual_seed(2)
        r = rollout.sample(m, processor, rows, n=2, max_new_tokens=6)
        every = torch.arange(len(r), device="cpu")
        logp = rollout.completion_logprobs(m, r, every)  # (BN, T)
        (logp * r.mask).sum().backward()
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g.full_tensor()).all() for g in grads)
