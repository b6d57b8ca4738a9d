"""Tool overhead: what the RVSM step costs on top of a plain optimizer step.

torchvision ``resnet18`` (``num_classes=10``, random weights), CPU, batch 32 of
64x64 inputs, SGD (lr 0.01, momentum 0.9). Two copies of the model train on
the same batch, step for step, interleaved (plain, RVSM, RVSM, plain, ...):

- plain step: forward, backward, ``optimizer.step()``;
- RVSM step: the same plus ``rvsm.add_coupling_grad()`` (``grad += beta (w - u)``)
  before the optimizer step and ``rvsm.after_optimizer_step(...)`` (the prox:
  TL1 on every conv/linear weight, then the group shrink) after it, every step
  (every ``--prox-every`` steps if set).

Reported: medians of both steps and ``overhead = (rvsm - plain) / plain``
(goal <= 10%; with ``--prox-every k`` the medians are of the mean step over
runs of k consecutive steps, each run holding exactly one prox), the phases of each step, and the pieces alone, timed in
isolation on the same state: the coupling gradient, the prox and its parts
(individual prox per tensor, channel norms, shrink factors, ``scale_``), the
thresholds, and the target controller's per-step update (only used with
``--target-macs``; not part of the overhead above).

``--device cuda`` runs the models, the batch and the RVSM state on the GPU (same
seeded weights and batch as on the CPU); every timer reading is then preceded
by ``torch.cuda.synchronize()``, so each phase is charged with its own kernels,
and the profiler records CUDA time as well.

    .venv/bin/python benchmarks/rvsm_overhead.py            # full run (a few minutes)
    .venv/bin/python benchmarks/rvsm_overhead.py --quick    # smoke run (seconds)
    .venv/bin/python benchmarks/rvsm_overhead.py --device cuda --out /tmp/rvsm_overhead_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from benchmarks.common import (  # noqa: E402
    command_line,
    load_average,
    machine_info,
    resolve_device,
    synchronize,
    timed_ms,
    write_json,
)
from compressor import method as method_mod  # noqa: E402
from compressor import recipe as recipe_mod  # noqa: E402
from compressor.config import Recipe  # noqa: E402
from compressor.groups import build_groups  # noqa: E402
from compressor.method.budget import BudgetController, Target  # noqa: E402
from compressor.method.splitting import Thresholds  # noqa: E402

log = logging.getLogger("benchmarks.rvsm_overhead")

SCHEMA_VERSION = 1
GOAL_OVERHEAD = 0.10
# The penalty of the measured step: TL1 individual + group lasso, no budget (lambda / beta).
OVERRIDES = [
    "penalty.individual.strength=0.5",
    "penalty.group.kind=l1",
    "penalty.group.strength=1.0",
    "penalty.group.weighting=size",
    "splitting.beta=1.0",
    "train.lr=0.01",
]


def _stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {
        "median_ms": round(statistics.median(s), 4),
        "p90_ms": round(s[min(len(s) - 1, max(0, -(-9 * len(s) // 10) - 1))], 4),
        "min_ms": round(s[0], 4),
        "n": len(s),
    }


def _time(
    fn: Callable[[], object], reps: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict:
    """``fn`` timed ``reps`` times; ``sync`` (CUDA) waits for the kernels before each reading."""
    return _stats(timed_ms(fn, reps, warmup, sync))


class Steps:
    """The plain and the RVSM training step, each on its own copy of the model."""

    def __init__(
        self,
        arch: str,
        batch: int,
        resolution: int,
        seed: int,
        prox_every: int = 1,
        device: str | torch.device = "cpu",
        fused: str = "auto",
    ):
        self.device = torch.device(device)
        torch.manual_seed(seed)
        base = getattr(torchvision.models, arch)(num_classes=10)
        self.plain = copy.deepcopy(base).to(self.device).train()
        self.model = copy.deepcopy(base).to(self.device).train()
        self.x = torch.randn(batch, 3, resolution, resolution).to(self.device)
        self.y = torch.randint(0, 10, (batch,)).to(self.device)
        self.groups = build_groups(self.model, self.x[:1])
        recipe = Recipe.from_dict(
            recipe_mod.load_recipe(
                "tl1-group",
                [*OVERRIDES, f"splitting.prox_every={prox_every}", f"splitting.fused={fused}"],
            )
        )
        # no targets and no seeker: the measured step is RVSM under lambda / beta alone
        self.method = method_mod.build(
            recipe, self.model, self.groups, total_steps=10_000, baseline={"params": 1}
        )
        self.rvsm = self.method.rvsm
        self.opt_plain = torch.optim.SGD(self.plain.parameters(), lr=0.01, momentum=0.9)
        self.opt_rvsm = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def thresholds(self) -> Thresholds:
        """The prox parameters of one step, in the form the RVSM primitives take."""
        lambdas, beta = self.method.lambdas, self.rvsm.beta
        ind = lambdas.individual_thresholds(beta)
        group = [
            torch.full((g.size,), float(mu), dtype=torch.float32)
            for g, mu in zip(self.groups, lambdas.group_mu(beta).tolist(), strict=True)
        ]
        return Thresholds(dict(ind.mu), dict(ind.a), group, dict(ind.scale))

    def sync(self) -> None:
        """Wait for the queued CUDA kernels (a no-op on the CPU)."""
        if self.device.type == "cuda":
            synchronize(self.device)

    def plain_step(self) -> dict[str, float]:
        self.sync()
        t0 = time.perf_counter()
        self.opt_plain.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.plain(self.x), self.y)
        loss.backward()
        self.sync()
        t1 = time.perf_counter()
        self.opt_plain.step()
        self.sync()
        t2 = time.perf_counter()
        return {"forward_backward": t1 - t0, "optimizer": t2 - t1, "total": t2 - t0}

    def rvsm_step(self) -> dict[str, float]:
        self.sync()
        t0 = time.perf_counter()
        self.opt_rvsm.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.sync()
        t1 = time.perf_counter()
        self.method.after_backward()
        self.sync()
        t2 = time.perf_counter()
        self.opt_rvsm.step()
        self.sync()
        t3 = time.perf_counter()
        self.method.after_step()
        self.sync()
        t4 = time.perf_counter()
        return {
            "forward_backward": t1 - t0,
            "coupling": t2 - t1,
            "optimizer": t3 - t2,
            "prox": t4 - t3,
            "total": t4 - t0,
        }


def interleaved(steps: Steps, reps: int, warmup: int) -> dict:
    """Alternate plain and RVSM steps (order flips every repetition); medians per phase."""
    for _ in range(warmup):
        steps.plain_step()
        steps.rvsm_step()
    plain: dict[str, list[float]] = {}
    rvsm: dict[str, list[float]] = {}
    for r in range(reps):
        order = ((steps.plain_step, plain), (steps.rvsm_step, rvsm))
        for fn, into in order if r % 2 == 0 else reversed(order):
            for k, v in fn().items():
                into.setdefault(k, []).append(v * 1e3)
    # Any k consecutive steps hold exactly one prox (k = prox_every): the cost per
    # step is the mean over such a run; k = 1 is the step itself.
    every = steps.rvsm.prox_every

    def per_step(ms: list[float]) -> list[float]:
        return [sum(ms[i : i + every]) / every for i in range(0, len(ms) - every + 1, every)]

    plain_runs, rvsm_runs = per_step(plain["total"]), per_step(rvsm["total"])
    ratios = [b / a for a, b in zip(plain_runs, rvsm_runs, strict=True)]
    return {
        "plain": {k: _stats(v) for k, v in plain.items()},
        "rvsm": {k: _stats(v) for k, v in rvsm.items()},
        "plain_per_step": _stats(plain_runs),
        "rvsm_per_step": _stats(rvsm_runs),
        "paired_ratio_median": statistics.median(ratios),
    }


def prox_parts(steps: Steps) -> dict[str, Callable[[], object]]:
    """The phases of ``RVSM.prox`` as separate callables (same calls, same order, same data).

    This follows ``compressor.method.splitting.RVSM.prox`` so each phase can be timed
    alone (each after the ones before it): with the one-pass fused prox, the
    group norms and shrink factors of ``w`` and then the fused pass; otherwise
    the individual prox, the norms and factors of ``u``, and ``scale_``. The
    whole prox is timed through the real method as well.
    """
    rvsm, groups = steps.rvsm, steps.groups
    thr = steps.thresholds()
    cache: dict[str, object] = {}
    if rvsm.fused and rvsm.can_fuse_prox(thr):

        def factors_of_w():
            cache["factors"] = rvsm.group_factors(rvsm.param_by_name, thr)

        return {
            "group_factors": factors_of_w,
            "sparse_group_pass": lambda: rvsm.sparse_group_pass_(thr, cache["factors"]),
        }

    def individual():
        rvsm.individual_prox_(thr)

    def factors_of_u():
        cache["factors"] = rvsm.group_factors(rvsm.u, thr)

    def scale():
        groups.scale_(rvsm.u, cache["factors"])

    return {"individual_prox": individual, "group_factors": factors_of_u, "scale_": scale}


def _fill_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def components(steps: Steps, reps: int) -> dict:
    """Each piece of the RVSM step, timed alone on the current state."""
    _fill_grads(steps.model)
    rvsm = steps.rvsm
    thr = steps.thresholds()
    sync = steps.sync
    out = {
        "add_coupling_grad": _time(rvsm.add_coupling_grad, reps, sync=sync),
        "thresholds": _time(steps.thresholds, reps, sync=sync),
        "prox": _time(lambda: rvsm.prox(thr), reps, sync=sync),
    }
    for name, part in prox_parts(steps).items():
        out[f"prox.{name}"] = _time(part, reps, sync=sync)  # leaves its result for the next
    # Which tensors dominate the individual prox: the five biggest, timed alone.
    sizes = sorted(
        ((p.numel(), n, p) for n, p in zip(rvsm.names, rvsm.params, strict=True)),
        key=lambda t: t[0],
        reverse=True,
    )
    out["penalised_tensors"] = len(rvsm.names)
    out["penalised_elements"] = sum(s for s, _, _ in sizes)
    out["model_elements"] = sum(p.numel() for p in steps.model.parameters())
    out["groups"] = len(steps.groups)
    out["group_members"] = sum(len(g.members) for g in steps.groups)
    return out


def controller_update(steps: Steps, reps: int) -> dict:
    """The budget's per-step threshold choice (``--target-macs 2``), on the current ``u``."""
    budget = BudgetController(
        [Target("macs", 2.0, 2.0)], steps.groups, steps.method.scale, total_steps=10_000
    )
    norms = steps.groups.channel_norms(steps.rvsm.u)
    return _time(lambda: budget.thresholds(100, norms), reps, sync=steps.sync)


def profile_step(steps: Steps, reps: int) -> list[dict]:
    """``torch.profiler`` of a few RVSM steps: the top CPU ops by self time (and their CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = steps.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            steps.rvsm_step()
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:25]:
        row = {
            "op": e.key,
            "calls_per_step": round(e.count / reps, 1),
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / reps, 3),
        }
        if cuda:
            device_us = getattr(e, "self_device_time_total", None)
            if device_us is None:  # torch before 2.4
                device_us = e.self_cuda_time_total
            row["self_device_ms_per_step"] = round(device_us / 1e3 / reps, 3)
        rows.append(row)
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--reps", type=int, default=None, help="interleaved step pairs (default 60)")
    p.add_argument("--warmup", type=int, default=None, help="untimed step pairs (default 5)")
    p.add_argument(
        "--component-reps", type=int, default=None, help="runs of each piece alone (default 30)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0 = torch's default). On a machine whose "
        "cores are busy with other work, 2+ threads make every small op wait for a "
        "descheduled worker, which inflates the many small ops of the prox most",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler pass")
    p.add_argument(
        "--prox-every",
        type=int,
        default=1,
        help="refresh u every k steps (the recipe's splitting.prox_every; default 1)",
    )
    p.add_argument(
        "--fused",
        choices=("auto", "on", "off"),
        default="auto",
        help="the recipe's splitting.fused: torch.compile'd coupling and TL1 prox (auto: on for resnet18)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the models and the batch live: cpu, cuda, cuda:N or auto (cuda when available)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few repetitions, no profiler")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default benchmarks/results/rvsm_overhead.json, rvsm_overhead_quick.json with --quick)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.out is None:
        args.out = Path(f"benchmarks/results/rvsm_overhead{'_quick' if args.quick else ''}.json")
    quick = args.quick
    reps = args.reps if args.reps is not None else (4 if quick else 60)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    comp_reps = args.component_reps if args.component_reps is not None else (3 if quick else 30)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = machine_info(device)
    started = time.perf_counter()

    steps = Steps(
        args.arch, args.batch, args.resolution, args.seed, args.prox_every, device, fused=args.fused
    )
    log.info("interleaving %d plain / RVSM step pairs ...", reps)
    steps_result = interleaved(steps, reps, warmup)
    plain_ms = steps_result["plain_per_step"]["median_ms"]
    rvsm_ms = steps_result["rvsm_per_step"]["median_ms"]
    overhead = (rvsm_ms - plain_ms) / plain_ms
    log.info("components ...")
    comp = components(steps, comp_reps)
    ctl = controller_update(steps, max(2, comp_reps // 5))
    profile = [] if (quick or args.no_profile) else profile_step(steps, 5)
    sparsity = {
        "u_zero_fraction": sum(int((t == 0).sum()) for t in steps.rvsm.u.values())
        / sum(t.numel() for t in steps.rvsm.u.values()),
        "u_zero_units": sum(int(m.sum()) for m in steps.groups.zero_masks(steps.rvsm.u)),
        "units": steps.groups.total_channels,
    }
    info["load_average_at_end"] = load_average()
    out = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "rvsm_step_overhead",
        "command": command_line("benchmarks/rvsm_overhead.py", argv),
        "machine": info,
        "settings": {
            "quick": quick,
            "arch": args.arch,
            "num_classes": 10,
            "batch": args.batch,
            "input_shape": [3, args.resolution, args.resolution],
            "optimizer": "SGD(lr=0.01, momentum=0.9)",
            "recipe_overrides": OVERRIDES,
            "beta": steps.rvsm.beta,
            "prox_every": steps.rvsm.prox_every,
            "fused": args.fused,
            "fused_in_use": steps.rvsm.fused,
            "reps": reps,
            "warmup": warmup,
            "component_reps": comp_reps,
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
        },
        "steps": steps_result,
        "plain_step_ms": plain_ms,
        "rvsm_step_ms": rvsm_ms,
        "overhead": overhead,
        "goal_overhead": GOAL_OVERHEAD,
        "goal_met": bool(overhead <= GOAL_OVERHEAD),
        "components": comp,
        "components_share_of_plain_step": {
            k: v["median_ms"] / plain_ms for k, v in comp.items() if isinstance(v, dict)
        },
        "target_controller_update": ctl,
        "profile_rvsm_step_top_ops": profile,
        "sparsity_after_run": sparsity,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.out, out)
    log.info(
        "plain %.1f ms, RVSM %.1f ms: overhead %.1f%% (goal <= %.0f%%); wrote %s",
        plain_ms,
        rvsm_ms,
        100 * overhead,
        100 * GOAL_OVERHEAD,
        args.out,
    )
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    main()
