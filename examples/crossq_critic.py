"""A CrossQ-style critic, renormified with the RL preset and steps counted per update.

CrossQ (Bhatt et al., ICLR 2024) drops target networks and puts batch renorm in its critics.
One critic update runs ONE joint forward of the current (s, a) and next (s', pi(s')) pairs,
so that both halves are normalized with the same batch statistics; the actor's loss runs
the critic once more (in eval mode). TorchRL, sb3-contrib and sbx ship their own
``BatchRenorm1d`` for this (momentum 0.01, r_max 3, d_max 5, batchnorm for the first
100,000 updates); here the critic is a plain ``nn.BatchNorm1d`` MLP and renorm-fx converts it:

    critic = renormify(Critic(), RenormSchedule.switch(warmup), momentum=0.01)
    count_updates(critic, critic_optimizer)          # the warm-up counts updates, not forwards

Trains on a generated linear-quadratic control task (no environment, no download) and
prints the critic's TD error and the time per update, against the same critic with plain
batchnorm. About a minute on two CPU cores:

    python examples/crossq_critic.py [--updates 1500] [--warmup 300] [--width 256] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from renorm_fx import RenormSchedule, bounds, count_updates, renormify

OBS, ACT, GAMMA = 8, 2, 0.9


class Critic(nn.Module):
    """Q(s, a): Linear-BatchNorm1d-ReLU x 2, then a linear head (CrossQ's critic, smaller)."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(OBS + ACT, width), nn.BatchNorm1d(width, momentum=0.01), nn.ReLU(),
            nn.Linear(width, width), nn.BatchNorm1d(width, momentum=0.01), nn.ReLU(),
            nn.Linear(width, 1),
        )

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, a], 1)).squeeze(1)


class Actor(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(OBS, width), nn.ReLU(), nn.Linear(width, ACT), nn.Tanh())

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s)


class Task:
    """s' = A s + B a + noise, reward -|s|^2 - 0.1 |a|^2: a generated replay buffer."""

    def __init__(self, size: int = 50_000, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.A = torch.eye(OBS) * 0.9 + 0.05 * torch.randn(OBS, OBS, generator=g)
        self.B = 0.5 * torch.randn(OBS, ACT, generator=g)
        self.s = torch.randn(size, OBS, generator=g) * torch.linspace(0.2, 3.0, OBS)  # badly scaled features
        self.a = torch.rand(size, ACT, generator=g) * 2 - 1
        self.r = -(self.s**2).sum(1) / OBS - 0.1 * (self.a**2).sum(1)
        self.s2 = self.s @ self.A.T + self.a @ self.B.T + 0.1 * torch.randn(size, OBS, generator=g)
        self.g = g

    def batch(self, n: int) -> tuple[torch.Tensor, ...]:
        i = torch.randint(0, self.s.shape[0], (n,), generator=self.g)
        return self.s[i], self.a[i], self.r[i], self.s2[i]


def critic_update(critic: nn.Module, actor: nn.Module, opt: torch.optim.Optimizer, batch) -> float:
    """CrossQ's critic step: one joint forward of (s, a) and (s', pi(s')); no target network."""
    s, a, r, s2 = batch
    with torch.no_grad():
        a2 = actor(s2)
    q, q_next = critic(torch.cat([s, s2]), torch.cat([a, a2])).chunk(2)
    target = r + GAMMA * q_next.detach()
    loss = F.mse_loss(q, target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def actor_update(critic: nn.Module, actor: nn.Module, opt: torch.optim.Optimizer, s: torch.Tensor) -> None:
    critic.eval()  # the actor's loss reads the critic with its running statistics, as CrossQ does
    loss = -critic(s, actor(s)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    critic.train()


def train(critic: nn.Module, updates: int, batch: int, seed: int, compiled: bool, tie: bool) -> dict:
    torch.manual_seed(seed)
    task, actor = Task(seed=seed), Actor()
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=1e-4)
    if tie:
        count_updates(critic, critic_opt)  # before torch.compile: the step advances per critic update
    step_critic = torch.compile(critic) if compiled else critic
    losses, times = [], []
    for k in range(updates):
        b = task.batch(batch)
        start = time.perf_counter()
        losses.append(critic_update(step_critic, actor, critic_opt, b))
        times.append(time.perf_counter() - start)
        if k % 3 == 0:  # the actor updates less often (policy delay)
            actor_update(critic, actor, actor_opt, b[0])
    tail = losses[-max(1, updates // 10):]
    return {"td": sum(tail) / len(tail), "ms": 1e3 * sorted(times[5:])[len(times[5:]) // 2], "critic": critic}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=300, help="updates of plain batchnorm (the libraries use 100k)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=256, help="transitions per update (the joint forward sees twice)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    schedule = RenormSchedule.switch(args.warmup, r_max=3.0, d_max=5.0)
    print(f"schedule: {schedule}\n")
    torch.manual_seed(args.seed)
    base = Critic(args.width)
    runs = {"batchnorm": (Critic(args.width), False),
            "renorm (renormify)": (renormify(base, schedule, momentum=0.01), True)}
    runs["batchnorm"][0].load_state_dict(base.state_dict())
    for name, (critic, tie) in runs.items():
        out = train(critic, args.updates, args.batch, args.seed, args.compile, tie)
        extra = f"   bounds now {bounds(critic)['net.1']}" if tie else ""
        print(f"{name:>20}: TD error (last 10%) {out['td']:.4f}, {out['ms']:.2f} ms / critic update{extra}")
    critic = runs["renorm (renormify)"][0]
    assert int(critic.net[1].num_batches_tracked) == args.updates  # one step per update, not per forward


if __name__ == "__main__":
    main()
