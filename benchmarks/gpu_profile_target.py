"""A short workload for Nsight Compute (scripts/gpu_check.sh with PROFILE=1): one Hamming top-k at the benchmark's
size (k = 1000) and one fused-loss forward + backward at B = 8192."""
import torch

import brcd
from cases import fused_loss, loss_case, loss_step


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    qp = brcd.pack_codes(torch.randn(10_000, 64, device="cuda", generator=gen))
    dp = brcd.pack_codes(torch.randn(1_000_000, 64, device="cuda", generator=gen))
    s, ta, tv, kw = loss_case(8192, 64, seed=8192, device="cuda")
    step = loss_step(fused_loss, s, ta, tv, kw)
    brcd.hamming_topk(qp, dp, 1000)
    step()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
