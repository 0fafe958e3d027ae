"""Benchmark: what one rank holds under --dist ddp vs --dist fsdp, and what a training step costs.

Run under torchrun (CPU + gloo here; the same script works on GPUs):
    torchrun --standalone --nproc_per_node=2 bench/dist_memory.py --model small --dist fsdp
    torchrun --standalone --nproc_per_node=2 bench/dist_memory.py --model small --dist ddp

It loads the policy as the stages do, wraps it, builds AdamW, and runs --steps SFT-style steps
(forward + backward + optimizer step on a fixed batch of synthetic rows). Then each rank reports
the bytes it holds itself: parameters (its shards under FSDP), gradients and AdamW's two moment
buffers, counted from the tensors (local shards of DTensors), plus the median step time. Process
RSS is also printed but on CPU it is dominated by the PyTorch runtime (~0.4 GB) for small models.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def local_bytes(tensors):
    """Bytes of the tensors as stored on this rank (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="tiny | small | a folder")
    ap.add_argument("--dist", default="fsdp", choices=["ddp", "fsdp"])
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 untimed)")
    ap.add_argument("--rows", type=int, default=8, help="rows per rank per step")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    import common
    import data
    import model as models
    import sft
    import task
    rank, _, world, device = common.init_distributed()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:  # each rank writes the same (seeded) rows into its own folder
        task.write_dataset(f"{tmp}/data", seed=0, n_sft_public=args.rows * world, n_sft_teacher=1, n_align=1,
                           n_rl=1, n_val=1, n_test=1, image_size=96)
        rows = data.load_sft(f"{tmp}/data/sft_public.json")[rank::world]
        model, processor, _ = models.load_model(args.model, device, train_vision=True)
        model = models.wrap_distributed(model, device, args.dist)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        batch = data.collate_sft([data.encode_sft(r, processor) for r in rows], processor.tokenizer.pad_token_id)
        times = []
        for step in range(args.steps + 2):
            t0 = time.time()
            loss, n = sft.token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers, to count them
            times.append(time.time() - t0)
        held = {"parameters": local_bytes(params), "gradients": local_bytes(p.grad for p in params),
                "adam_states": local_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")}
        report = torch.tensor([held["parameters"], held["gradients"], held["adam_states"],
                               statistics.median(times[2:]), common.peak_memory_mb(device)], dtype=torch.float64)
        gathered = [torch.zeros_like(report) for _ in range(world)] if world > 1 else [report]
        if world > 1:
            torch.distributed.all_gather(gathered, report)
        if rank == 0:
            total = sum(p.numel() for p in models.unwrap(model).parameters())
            print(f"{args.model} ({total / 1e6:.2f}M parameters), --dist {args.dist}, {world} ranks, "
                  f"{args.rows} rows per rank, {args.threads} thread(s) each")
            print("| rank | parameters MB | gradients MB | AdamW states MB | step s (median) | peak RSS MB |")
            print("|---|---|---|---|---|---|")
            for r, g in enumerate(gathered):
                print(f"| {r} | {g[0] / 2**20:.2f} | {g[1] / 2**20:.2f} | {g[2] / 2**20:.2f} | {g[3]:.3f} | {g[4]:.0f} |")
    common.finish()


if __name__ == "__main__":
    main()
