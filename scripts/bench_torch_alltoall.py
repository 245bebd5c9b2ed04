"""All-to-all bandwidth through PyTorch's NCCL (one process per GPU), the baseline for
`candiff bench exchange` on the same machine: bytes each rank sends to its peers per second.

    torchrun --nproc-per-node 2 scripts/bench_torch_alltoall.py --mib 4,20,64
"""
import argparse
import os
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="4,20,64", help="bytes per peer per all-to-all, MiB")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    for mib in (int(m) for m in args.mib.split(",")):
        elems = (mib << 20) // 2
        send = torch.zeros(n * elems, dtype=torch.bfloat16, device="cuda")
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            dist.all_to_all_single(recv, send)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rate = torch.tensor([(mib << 20) * (n - 1) * args.iters / dt], device="cuda")
        dist.all_reduce(rate, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"torch {n} GPUs, all-to-all of {mib} MiB pieces: {rate.item() / 1e9:.1f} GB/s sent per rank (slowest rank)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
