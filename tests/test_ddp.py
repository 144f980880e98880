"""torch.distributed: per-replica renorm under DDP, and cross-replica renorm (``sync=True``).

Real process groups: 2 processes on this machine with gloo, spawned once per group of
scenarios and bounded in time. The workers save what they saw; this process compares it
with one process on the whole batch (or on each process's own part).
"""

from __future__ import annotations

import copy
import pickle
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

import models
from renorm_fx import RenormSchedule, bounds, renormify
from renorm_fx.distributed import RenormSync

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORLD = 2
TIMEOUT = 180.0  # seconds for one launch, start-up included (a cold compile takes ~40 s here)
CLIP = RenormSchedule.constant(1.5, 0.5)  # with scrambled running statistics: r and d clip
RAMP = RenormSchedule.paper(r_max=2.0, d_max=1.0, warmup=1, r_max_at=5, d_max_at=4)  # bounds change every step
PARTS = [slice(0, 5), slice(5, 8)]  # uneven: the global moments weigh each process's count
TOL = dict(rtol=1e-10, atol=1e-10)


# ---- the steps every process (and the single-process reference) runs ------------------------


def _model(sync_batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = models.scramble_stats(models.SmallCNN()).double()
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_batch_norm else model


def _batches(steps: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches (input, output gradient), the same in every process."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1,
             torch.randn(8, 4, generator=g, dtype=torch.float64)) for _ in range(steps)]


def _train(model: nn.Module, part: slice, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """Steps on ``part`` of each global batch (loss: sum(y * g)): per step the output and this
    process's gradients; then SGD on ``reduce(gradient)``. Returns the trace and final state."""
    trace = []
    for x, g in _batches():
        x = x[part].clone().requires_grad_()
        y = model(x)
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(y, [x, *params.values()], g[part])
        trace.append({"y": y.detach(), "x": grads[0], **dict(zip(params, grads[1:]))})
        with torch.no_grad():
            for p, grad in zip(params.values(), grads[1:]):
                p -= 0.1 * reduce(grad)
    return {"trace": trace, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


SYNC_CONFIGS = {  # name: (SyncBatchNorm layers?, renormify keywords, parts); each equals one process on the whole batch
    "sync": (False, dict(sync=True), PARTS),
    "sync_batch_norm": (True, dict(), PARTS),  # nn.SyncBatchNorm layers synchronize by default
    "sync_variance": (False, dict(sync=True, running_stats="variance"), PARTS),
    "sync_empty": (False, dict(sync=True), [slice(0, 8), slice(8, 8)]),  # a process with no examples
    "sync_one_each": (False, dict(sync=True), [slice(0, 1), slice(1, 2)]),  # BatchNorm1d on 1 example each
}


def _scenario_sync(rank: int, tmp: Path) -> dict[str, Any]:
    out = {}
    for name, (sync_bn, kwargs, parts) in SYNC_CONFIGS.items():
        out[name] = _train(renormify(_model(sync_bn), CLIP, **kwargs), parts[rank], _sum_over_ranks)
    return out


def _scenario_local(rank: int, tmp: Path) -> dict[str, Any]:
    # sync=False: even nn.SyncBatchNorm layers normalize over this process's batch only
    return _train(renormify(_model(sync_batch_norm=True), CLIP, sync=False), PARTS[rank], lambda g: g)


def _ddp_steps(ddp: nn.Module, model: nn.Module, steps: range, rank: int, shape: tuple[int, ...] = (4, 3, 6, 6),
               before_step: Callable[[int], None] | None = None) -> list[dict[str, torch.Tensor]]:
    """SGD steps of ``model`` wrapped in DDP (``ddp``) on this process's own data; per step
    the output and gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randn(shape, generator=g) * 2 + 1 for _ in range(max(steps) + 1)]
    trace = []
    for step in steps:
        if before_step is not None:
            before_step(step)
        opt.zero_grad()
        y = ddp(batches[step])
        y.square().mean().backward()
        trace.append({"y": y.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}})
        opt.step()
    return trace


def _scenario_ddp(rank: int, tmp: Path) -> dict[str, Any]:
    """Per-replica renorm under DDP: 4 steps, a checkpoint after 2, and a resumed run."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def ddp_of(model: nn.Module, snapshots: list) -> nn.Module:
        # what each forward sees, after DDP's broadcast of rank 0's buffers
        model.register_forward_pre_hook(lambda m, args: snapshots.append(
            {k: v.clone() for k, v in m.named_buffers()}))
        return DDP(model)

    torch.manual_seed(0)
    model = renormify(models.scramble_stats(models.SmallCNN()), RAMP)
    seen: list = []
    ddp = ddp_of(model, seen)

    def before_step(step: int) -> None:
        if step == 2:
            if rank == 0:
                torch.save(model.state_dict(), tmp / "checkpoint.pt")
            dist.barrier()
            if rank == 1:  # rank 0's buffers must win; this process's diagnostics must stay
                with torch.no_grad():
                    model.get_buffer("bn.running_mean").add_(1.0)
                    model.get_buffer("bn.renorm_nonfinite").fill_(7)

    with warnings.catch_warnings():  # rank 1's count of 7 non-finite batches: warned about
        warnings.simplefilter("ignore", RuntimeWarning)
        _ddp_steps(ddp, model, range(4), rank, before_step=before_step)
    run = {"seen": seen, "state": model.state_dict(), "bounds": bounds(model),
           "nonfinite": int(model.get_buffer("bn.renorm_nonfinite")),
           "diagnostics": model.get_buffer("bn.renorm_diagnostics").clone(),
           "broadcast": sorted(ddp.named_module_buffers)}

    torch.manual_seed(1)  # another initialization: everything must come from the checkpoint
    resumed = renormify(models.SmallCNN(), RAMP)
    resumed.load_state_dict(torch.load(tmp / "checkpoint.pt", weights_only=True))
    resumed_bounds = bounds(resumed)
    _ddp_steps(ddp_of(resumed, []), resumed, range(2, 4), rank)
    return {"run": run, "resumed": {"state": resumed.state_dict(), "bounds": bounds(resumed),
                                    "start_bounds": resumed_bounds}}


class _Mixed(nn.Module):
    """A user's model class (Dynamo starts its frame here: torch.nn's containers it only inlines)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _mixed() -> nn.Module:
    """A synchronized layer and a per-replica one: parts renormified separately (an
    nn.SyncBatchNorm layer would do, but on CPU DDP refuses modules with one)."""
    torch.manual_seed(0)
    synced = renormify(nn.Sequential(nn.Linear(7, 16), nn.BatchNorm1d(16)), RAMP, sync=True)
    body = nn.Sequential(synced, nn.ReLU(), nn.Linear(16, 3), nn.BatchNorm1d(3))
    return renormify(models.scramble_stats(_Mixed(body)), RAMP)


def _scenario_compiled(rank: int, tmp: Path) -> dict[str, Any]:
    """torch.compile of a DDP-wrapped renormified model against the same model eagerly."""
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for compiled in (False, True):
        model = _mixed()
        ddp = DDP(model)
        trace = _ddp_steps(torch.compile(ddp) if compiled else ddp, model, range(4), rank, shape=(4, 7))
        out["compiled" if compiled else "eager"] = {"trace": trace, "state": model.state_dict()}
    out["unique_graphs"] = counters["stats"]["unique_graphs"]
    return out


SCENARIOS = {"sync": _scenario_sync, "local": _scenario_local, "ddp": _scenario_ddp, "compiled": _scenario_compiled}


# ---- launching the processes -----------------------------------------------------------------


def _worker(rank: int, tmp: str, names: list[str]) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        results = {name: SCENARIOS[name](rank, Path(tmp)) for name in names}
        torch.save(results, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _launch(tmp: Path, names: list[str]) -> list[dict[str, Any]]:
    """Run the named scenarios in WORLD processes; their results, by rank. A failure in any
    process raises here (with its traceback); a hung run is killed after TIMEOUT seconds."""
    context = mp.start_processes(_worker, args=(str(tmp), names), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} processes did not finish {names} within {TIMEOUT:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    return _launch(tmp_path_factory.mktemp("ddp"), list(SCENARIOS))


# ---- cross-replica renorm: the processes together equal one process on the whole batch -------


@pytest.mark.parametrize("config", list(SYNC_CONFIGS))
def test_sync_equals_one_process_on_the_whole_batch(ranks, config):
    sync_bn, kwargs, parts = SYNC_CONFIGS[config]
    whole = slice(parts[0].start, parts[-1].stop)
    want = _train(renormify(_model(sync_bn), CLIP, **kwargs), whole, lambda g: g)  # no process group
    got = [r["sync"][config] for r in ranks]
    for step, expected in enumerate(want["trace"]):
        traces = [g["trace"][step] for g in got]
        for key in ("y", "x"):  # each process has its part of the batch's output and input gradient
            assert_close(torch.cat([t[key] for t in traces]), expected[key], **TOL, msg=f"{key}, step {step}")
        for key in expected.keys() - {"y", "x"}:  # parameters: each process its share, DDP sums them
            assert_close(sum(t[key] for t in traces), expected[key], **TOL, msg=f"{key}, step {step}")
    for g in got:  # running statistics and steps: the whole batch's, in every process
        for key, value in want["state"].items():
            assert_close(g["state"][key], value, **TOL, msg=key)
    assert int(want["state"]["bn.num_batches_tracked"]) == 3


def test_without_sync_each_process_equals_one_process_on_its_part(ranks):
    for rank, result in enumerate(ranks):
        want = _train(renormify(_model(sync_batch_norm=True), CLIP, sync=False), PARTS[rank], lambda g: g)
        for step, expected in enumerate(want["trace"]):
            for key, value in expected.items():
                assert_close(result["local"]["trace"][step][key], value, **TOL, msg=f"rank {rank}: {key}, {step}")
        for key, value in want["state"].items():
            assert_close(result["local"]["state"][key], value, **TOL, msg=f"rank {rank}: {key}")
    # and the parts differ: the processes did normalize differently
    assert not torch.allclose(ranks[0]["local"]["state"]["bn.running_mean"], ranks[1]["local"]["state"]["bn.running_mean"])


# ---- per-replica renorm under DistributedDataParallel ----------------------------------------


def test_ddp_broadcasts_statistics_and_steps_not_diagnostics(ranks):
    runs = [r["ddp"]["run"] for r in ranks]
    assert len(runs[0]["seen"]) == len(runs[1]["seen"]) == 4
    for step, (seen0, seen1) in enumerate(zip(runs[0]["seen"], runs[1]["seen"])):
        # every forward starts from rank 0's running statistics and step (even after rank 1's were changed)
        for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "bn_head.running_var"):
            assert torch.equal(seen0[key], seen1[key]), (step, key)
        assert int(seen0["bn.num_batches_tracked"]) == step
    # the diagnostics are each process's own: not broadcast, so rank 1 keeps its count
    assert not any("renorm_diagnostics" in k or "renorm_nonfinite" in k for k in runs[0]["broadcast"])
    assert "bn.running_mean" in runs[0]["broadcast"]
    assert (runs[0]["nonfinite"], runs[1]["nonfinite"]) == (0, 7)
    assert not torch.equal(runs[0]["diagnostics"], runs[1]["diagnostics"])  # r, d of its own batch
    # DDP keeps the parameters identical; the schedule advanced in both
    for key, value in runs[0]["state"].items():
        if "running" not in key:  # the last step's update is each process's own until the next broadcast
            assert torch.equal(runs[1]["state"][key], value), key
    assert runs[0]["bounds"] == runs[1]["bounds"] == {n: RAMP.at(4) for n in ("bn", "bn_head")}


def test_ddp_resume_continues_the_schedule(ranks):
    for result in ranks:
        run, resumed = result["ddp"]["run"], result["ddp"]["resumed"]
        assert resumed["start_bounds"] == {n: RAMP.at(2) for n in ("bn", "bn_head")}
        assert resumed["bounds"] == run["bounds"]
        for key, value in run["state"].items():  # the resumed run is the uninterrupted one
            assert_close(resumed["state"][key], value, rtol=1e-6, atol=1e-6, msg=key)


# ---- one process: sync is a no-op; the graph -------------------------------------------------


def _same_run(a: nn.Module, b: nn.Module) -> None:
    ta, tb = (_train(m, slice(None), lambda g: g) for m in (a, b))
    for sa, sb in zip(ta["trace"], tb["trace"]):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    for key in ta["state"]:
        assert torch.equal(ta["state"][key], tb["state"][key]), key


@pytest.mark.parametrize("running_stats", ["sigma", "variance"])
def test_one_process_sync_is_exactly_local(tmp_path, running_stats):
    local = renormify(_model(), CLIP, running_stats=running_stats)
    synced = renormify(_model(), CLIP, running_stats=running_stats, sync=True)
    _same_run(synced, local)  # no process group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        _same_run(renormify(_model(), CLIP, running_stats=running_stats, sync=True),
                  renormify(_model(), CLIP, running_stats=running_stats))  # a group of one
    finally:
        dist.destroy_process_group()


def test_a_specific_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        layers = nn.SyncBatchNorm.convert_sync_batchnorm(_model(), process_group=group)
        converted = renormify(layers, CLIP)  # the copy shares the layers' group
        assert converted.get_submodule("bn").process_group is group
        synced = renormify(_model(), CLIP, sync=True, process_group=group)
        assert repr(synced.bn.renorm_sync) == f"RenormSync(process_group={group.group_name!r})"
        assert copy.deepcopy(synced).bn.renorm_sync.process_group is group
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(synced)
        _same_run(synced, renormify(_model(), CLIP))  # one process: nothing synchronized
    finally:
        dist.destroy_process_group()


def test_graph_names_the_sync_group():
    plain = renormify(_model(), CLIP).bn
    assert renormify(_model(), CLIP, sync=False).bn.code == plain.code  # the local graph is unchanged
    assert "sync" not in plain.code and plain.renorm_sync is None
    synced = renormify(_model(), CLIP, sync=True).bn
    assert "_renorm_sync = self._renorm_sync" in synced.code
    assert "batch_moments(input_1, running_mean, 'bn', (4,), _renorm_sync)" in synced.code
    assert "1e-05, _renorm_sync, batch_count)" in synced.code  # batch_norm_with_stats: the global gradient
    assert repr(synced.renorm_sync) == "RenormSync(process_group=default)"
    sync_bn = renormify(_model(sync_batch_norm=True), CLIP).bn
    assert "_renorm_sync" in sync_bn.code  # a SyncBatchNorm layer: its own process_group
    assert sync_bn.renorm_sync.process_group is None
    assert "sync" not in renormify(_model(sync_batch_norm=True), CLIP, sync=False).bn.code


def test_sync_model_state_copies_and_pickle():
    synced = renormify(_model(), CLIP, sync=True)
    assert set(synced.state_dict()) == set(_model().state_dict())  # nothing added
    _model().load_state_dict(synced.state_dict(), strict=True)
    for clone in (copy.deepcopy(synced), pickle.loads(pickle.dumps(synced))):
        assert clone.bn.code == synced.bn.code and isinstance(clone.bn.renorm_sync, RenormSync)
    with pytest.raises(ValueError, match="pass sync=True"):
        renormify(_model(), CLIP, process_group=object())


def test_compiled_ddp_equals_eager_ddp(ranks):
    """torch.compile(DDP(renormify(model))): a synchronized and a per-replica layer, one graph."""
    for rank, result in enumerate(ranks):
        eager, compiled = result["compiled"]["eager"], result["compiled"]["compiled"]
        for step, (got, want) in enumerate(zip(compiled["trace"], eager["trace"])):
            for key, value in want.items():
                models.assert_scaled_close(got[key], value, 1e-4, f"rank {rank}: {key}, step {step}")
        for key, value in eager["state"].items():
            if value.is_floating_point():
                models.assert_scaled_close(compiled["state"][key], value, 1e-4, f"rank {rank}: {key}")
            else:
                assert torch.equal(compiled["state"][key], value), key
        assert result["compiled"]["unique_graphs"] == 1  # the bounds changed every step: no recompile
    # the synchronized layer's statistics are global (the same everywhere), the other's local
    states = [r["compiled"]["compiled"]["state"] for r in ranks]
    assert_close(states[0]["body.0.1.running_mean"], states[1]["body.0.1.running_mean"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(states[0]["body.3.running_mean"], states[1]["body.3.running_mean"])
