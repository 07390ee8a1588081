"""Train every architecture the same way on the synthetic suite, cache what training made, and measure one row.

What is the same for every architecture (the fairness the issue asks for):

* the **parameter budget**: MHA's total at the base `ArchConfig`; every other architecture's MLP width `d_ff` is
  set so that its total comes closest to that budget (within `TOLERANCE`; the exact counts are reported);
* the **data**: `suite.mixed_batch` from one `torch.Generator(seed)`, the three tasks in turn, each step at a
  length drawn uniformly from [L/2, L] (the training length L is the longest the model sees);
* the **optimiser**: AdamW (betas 0.9/0.95, weight decay on matrices only, as nanoGPT), a linear warmup then a
  cosine decay to `min_lr`, gradient norm clipped to `clip`, the loss on the answers' positions only (as Zoology);
* the **steps and seed** (the seed also fixes the initial weights).

Evaluation: exact-match accuracy per task at L/2, L, 2L and 4L (the last two beyond the training length:
extrapolation), the same sequences for every architecture; cache bytes measured from the tensors each layer's
cache holds (`TinyLM.cache_nbytes`, i.e. `reference_impls.base.nbytes`) after a prefill of each length, in a bf16
copy of the model so that bytes are in the atlas's 16-bit unit (`base.UNIT_BYTES`), and once more after one
decoded token: the marginal bytes per token are 0 for a constant-size state.

Trained weights and loss curves are cached under `$KVATLAS_CACHE/architectures/` (default ~/.cache/kvatlas), one
folder per (architecture, config, training config, code version): the code version hashes the sources of this
file, the suite, `common.py` and the modules of the model's mixers, so editing any of them retrains exactly the
architectures it touches, and nothing else ever retrains.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from reference_impls.architectures import suite
from reference_impls.architectures.common import ArchConfig, build

__all__ = ["ARCHS", "TOLERANCE", "TrainConfig", "arch_config", "bench_row", "cache_root", "code_version",
           "lr_scale", "match_budget", "measure_cache", "param_count", "train", "trained"]

ARCHS = ("mha", "mqa", "gqa", "mla", "cla", "yoco", "linear", "mamba", "griffin")
#: largest relative gap between an architecture's parameter count and the budget
TOLERANCE = 0.10


@dataclass(frozen=True)
class TrainConfig:
    """Training and evaluation settings shared by every architecture.

    Defaults sized so that one architecture trains and is evaluated in about 3 minutes on one CPU thread.
    """

    steps: int = 1000
    batch: int = 16          # rows per step, the three tasks in turn
    length: int = 64         # training length L (steps draw lengths in [L/2, L]); evaluation at L/2, L, 2L, 4L
    lr: float = 3e-3         # of 3e-3 and 1e-2, the one MHA learned the suite with in 1,500 steps
    warmup: float = 0.05     # fraction of the steps in linear warmup
    min_lr: float = 3e-4     # end of the cosine decay
    weight_decay: float = 0.1
    clip: float = 1.0        # max gradient norm
    seed: int = 0
    eval_n: int = 96         # sequences per task and length
    eval_seed: int = 1234

    def __post_init__(self):
        for name in ("steps", "batch", "eval_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch < len(suite.TASKS):
            raise ValueError(f"batch={self.batch} must be >= {len(suite.TASKS)} (one row per task)")
        need = max(t.min_length for t in suite.TASKS.values())
        if self.length // 2 < need:
            raise ValueError(f"length={self.length} must be >= {2 * need} (L/2 must hold every task)")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"warmup={self.warmup} must be in [0, 1] (a fraction of the steps)")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be in (0, lr={self.lr}]")

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        return self.length // 2, self.length, 2 * self.length, 4 * self.length


def param_count(model: torch.nn.Module) -> int:
    """Parameters, each counted once (the head is tied to the embedding)."""
    return sum(p.numel() for p in model.parameters())


def arch_config(arch: str, base: ArchConfig = ArchConfig()) -> ArchConfig:
    """The base config with the KV-head count each head-sharing architecture is named for (MQA 1, GQA 2)."""
    kv = {"mqa": 1, "gqa": 2}.get(arch, base.n_heads)
    return dataclasses.replace(base, n_kv_heads=kv)


def match_budget(arch: str, cfg: ArchConfig, budget: int, tolerance: float = TOLERANCE) -> tuple[ArchConfig, int]:
    """cfg with the d_ff whose total parameter count is closest to `budget` -> (config, its count).

    The count is linear in d_ff (a SwiGLU MLP per layer), so two builds give the slope and the neighbours of
    the solution are checked exactly."""
    def count(d_ff: int) -> int:
        return param_count(build(arch, dataclasses.replace(cfg, d_ff=d_ff)))

    a, b = cfg.d_ff, cfg.d_ff + 16
    pa, pb = count(a), count(b)
    guess = max(1, round(a + (budget - pa) * (b - a) / (pb - pa)))
    best = min(range(max(1, guess - 2), guess + 3), key=lambda d: abs(count(d) - budget))
    params = count(best)
    if abs(params - budget) > tolerance * budget:
        raise ValueError(f"{arch}: {params} parameters at d_ff={best}, more than {tolerance:.0%} away from the "
                         f"budget of {budget} (its mixers alone exceed it)")
    return dataclasses.replace(cfg, d_ff=best), params


def lr_scale(step: int, tc: TrainConfig) -> float:
    """Multiplier of tc.lr at `step`: linear warmup to 1, then a cosine decay to min_lr / lr at the last step."""
    warmup = round(tc.warmup * tc.steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, tc.steps - warmup - 1)
    floor = tc.min_lr / tc.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(model: torch.nn.Module, tc: TrainConfig, progress: Optional[Callable[[int, float], None]] = None
          ) -> list[float]:
    """Train in place on the mixed suite; returns the loss of every step."""
    gen = torch.Generator().manual_seed(tc.seed)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": tc.weight_decay},
                             {"params": others, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_scale(s, tc))
    model.train()
    curve = []
    for step in range(tc.steps):
        # each step draws its length from [L/2, L]: a model trained at one length only can key its answers to
        # absolute positions (the copy marker always at the same place) and then fails at shorter lengths too
        length = int(torch.randint(tc.length // 2, tc.length + 1, (1,), generator=gen))
        ids, targets, mask = suite.mixed_batch(tc.batch, length, gen)
        loss = F.cross_entropy(model(ids)[mask], targets[mask])  # the answers only: the rest is noise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if progress:
            progress(step, curve[-1])
    model.eval()
    return curve


# ---------------------------------------------------------------------------------------------------- cache
def cache_root() -> Path:
    root = os.environ.get("KVATLAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvatlas")
    return Path(root) / "architectures"


def code_version(model: torch.nn.Module) -> str:
    """Hash of the sources that decide what training makes: this file, the suite, common.py and every
    module under reference_impls.architectures that defines one of the model's submodules."""
    mods = {__name__, suite.__name__, build.__module__}
    mods |= {type(m).__module__ for m in model.modules() if type(m).__module__.startswith("reference_impls.")}
    h = hashlib.sha1()
    for name in sorted(mods):
        h.update(name.encode() + b"\0" + Path(inspect.getsourcefile(sys.modules[name])).read_bytes())
    return h.hexdigest()[:12]


def _run_dir(arch: str, cfg: ArchConfig, tc: TrainConfig, version: str) -> Path:
    key = json.dumps({"arch": arch, "config": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc),
                      "code": version}, sort_keys=True)
    return cache_root() / f"{arch}-{tc.steps}steps-seed{tc.seed}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def trained(arch: str, tc: TrainConfig, base: ArchConfig = ArchConfig(), budget: Optional[int] = None,
            progress: Optional[Callable[[int, float], None]] = None) -> tuple[torch.nn.Module, dict]:
    """The architecture at the shared budget, trained (or loaded from the cache) -> (model in eval mode, meta).

    meta: arch, config, params, budget, train config, code version, loss curve, train_s (wall) and train_cpu_s
    (this process's CPU time: on a shared machine the honest cost), threads (of the run that trained it), cached
    (True when loaded), folder."""
    if budget is None:
        budget = param_count(build("mha", arch_config("mha", base)))
    cfg, params = match_budget(arch, arch_config(arch, base), budget)
    torch.manual_seed(tc.seed)  # the initial weights
    model = build(arch, cfg)
    version = code_version(model)
    folder = _run_dir(arch, cfg, tc, version)
    if (folder / "meta.json").is_file():
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        meta = json.loads((folder / "meta.json").read_text())
        meta["curve"] = json.loads((folder / "curve.json").read_text())
        model.eval()
        return model, dict(meta, cached=True, folder=str(folder))
    t0, c0 = time.perf_counter(), time.process_time()
    curve = train(model, tc, progress)
    meta = {"arch": arch, "config": dataclasses.asdict(cfg), "params": params, "budget": budget,
            "train": dataclasses.asdict(tc), "code_version": version,
            "train_s": round(time.perf_counter() - t0, 2), "train_cpu_s": round(time.process_time() - c0, 2),
            "threads": torch.get_num_threads(),
            "final_loss": sum(curve[-10:]) / len(curve[-10:])}
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")  # written whole, then renamed: never half a run
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    (tmp / "curve.json").write_text(json.dumps([round(x, 5) for x in curve]))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return model, dict(meta, curve=curve, cached=False, folder=str(folder))


# ---------------------------------------------------------------------------------------------------- measure
@torch.no_grad()
def measure_cache(model: torch.nn.Module, length: int, seed: int = 0) -> dict:
    """Bytes the caches hold after a prefill of `length` tokens and after one more decoded token, measured from
    the held tensors of a bf16 copy (the 16-bit unit); and the largest gap between the fp32 model's incremental
    logits (`step`) and its parallel forward on the same tokens, a check that the cache serves what it should."""
    ids = suite.TASKS["passkey"].batch(1, length + 1, torch.Generator().manual_seed(seed))[0]
    gap = (model.step(ids, model.new_caches(1)) - model(ids)).abs().max().item()
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    caches = m16.new_caches(1)
    m16.step(ids[:, :length], caches)
    held = m16.cache_nbytes(caches)
    m16.step(ids[:, length:], caches)
    return {"bytes": held, "bytes_per_token": held / length, "marginal_bytes_per_token":
            m16.cache_nbytes(caches) - held, "step_vs_forward": gap}


def bench_row(arch: str, tc: TrainConfig, base: ArchConfig = ArchConfig(), budget: Optional[int] = None,
              progress: Optional[Callable[[int, float], None]] = None) -> dict:
    """One JSON-able row: the trained architecture's parameters, cache bytes and accuracies at every length."""
    model, meta = trained(arch, tc, base, budget, progress)
    t0 = time.perf_counter()
    lengths = tc.eval_lengths
    accuracy = {name: {str(L): round(task.accuracy(model, L, tc.eval_n, seed=tc.eval_seed + L), 4) for L in lengths}
                for name, task in suite.TASKS.items()}
    cache = {str(L): measure_cache(model, L, seed=tc.eval_seed) for L in lengths}
    marginal = [c["marginal_bytes_per_token"] for c in cache.values()]
    constant = all(m == 0 for m in marginal)
    return {"arch": arch, "params": meta["params"], "budget": meta["budget"], "d_ff": meta["config"]["d_ff"],
            "config": meta["config"], "train": meta["train"], "train_length": tc.length, "lengths": list(lengths),
            "cache_dtype": "bfloat16", "cache_bytes": {L: c["bytes"] for L, c in cache.items()},
            "bytes_per_token": {L: round(c["bytes_per_token"], 2) for L, c in cache.items()},
            "marginal_bytes_per_token": {L: m for L, m in zip(cache, marginal)},
            "constant_state": constant, "state_bytes": cache[str(lengths[-1])]["bytes"] if constant else None,
            "step_vs_forward": max(c["step_vs_forward"] for c in cache.values()),
            "accuracy": accuracy, "final_loss": round(meta["final_loss"], 4), "train_s": meta["train_s"],
            "train_cpu_s": meta["train_cpu_s"],
            "train_threads": meta["threads"], "eval_s": round(time.perf_counter() - t0, 2),
            "cached": meta["cached"], "code_version": meta["code_version"]}
