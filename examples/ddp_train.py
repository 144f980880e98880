"""Train a renormified CNN with DistributedDataParallel, one process per device.

    torchrun --nproc_per_node=2 examples/ddp_train.py                # per-replica statistics
    torchrun --nproc_per_node=2 examples/ddp_train.py --sync --batch 2  # over the global batch

On CPU the processes talk through gloo; with one GPU per process, NCCL. The data is
synthetic: each process draws its own examples.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from renorm_fx import RenormSchedule, bounds, renormify


class Net(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sync", action="store_true", help="batch statistics over all processes' examples")
    parser.add_argument("--batch", type=int, default=8, help="examples per process and step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="torch.compile the DDP model")
    parser.add_argument("--save", default="", help="save rank 0's state_dict here at the end")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    schedule = RenormSchedule.paper(warmup=5, r_max_at=25, d_max_at=15)  # the paper's, shortened
    model = renormify(Net(), schedule, sync=args.sync).to(device)
    ddp = DDP(model, device_ids=[local_rank] if cuda else None)  # broadcasts rank 0's state
    net = torch.compile(ddp) if args.compile else ddp
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    g = torch.Generator().manual_seed(rank)  # each process its own examples
    for step in range(args.steps):
        labels = torch.randint(0, 4, (args.batch,), generator=g)
        x = torch.randn(args.batch, 3, 16, 16, generator=g) + labels.view(-1, 1, 1, 1).float()
        loss = F.cross_entropy(net(x.to(device)), labels.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            r_max, d_max = bounds(model)["bn1"]
            print(f"step {step:3d}  loss {loss.item():.3f}  r_max {r_max:.2f}  d_max {d_max:.2f}", flush=True)

    if rank == 0:
        mode = "global batch" if args.sync else "per-replica"
        print(f"{world} processes x {args.batch} examples, {mode} statistics; "
              f"bn1 step {int(model.bn1.num_batches_tracked)}")
        if args.save:
            torch.save(model.state_dict(), args.save)  # loads into Net() or renormify(Net()), strict
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
