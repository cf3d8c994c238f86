"""One run of the scaling study: resumable training (the library's checkpoints) and its probe.

A run is (corpus, model size, seed, arm). Its result is ``OUT/runs/<name>.json``; a run whose
result exists is skipped. While it trains, ``OUT/checkpoints/<name>.safetensors`` (written with
``l2e_optim.save_checkpoint``: model, optimizer with the L2E state, scheduler, and the step,
losses, CPU time and global RNG state as metadata) is refreshed every ``checkpoint_every``
steps, so a killed study resumes where it stopped and trains bit for bit as if uninterrupted
(the data windows are replayed from their seed; the random-selection control draws from the
global RNG, which the checkpoint restores).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from l2e_optim import L2EConfig, L2EWrapper, load_checkpoint, monosemanticity_scores, position_shares, save_checkpoint
from l2e_optim._lab.corpus import Corpus, batches
from l2e_optim._lab.pretrain import Method, RunResult, RunSpec, evaluate, setup, train_step
from l2e_optim._src.discovery import discover_sites
from l2e_optim._src.selection import retrieve

from . import _probe

#: Pythia's head size at 14M/70M-like widths is 32-64; 32 lets the smallest model keep one head.
BASE_SHAPE = "pythia-14m"
#: The four arms. "random" is the control (same penalty, values drawn blind to their scores);
#: "memel" is the faithful MEmeL: Reverse Deactivation of each sequence's top-1 score.
ARMS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "l2e": {"inhibition": "l2e"},
    "random": {"inhibition": "l2e", "retrieval": "random"},
    "memel": {"inhibition": "memel", "retrieval": "sample-topk", "memel_topk": 1},
}
#: The global RNG of a run starts from this plus the run's seed (distinct from the init seed).
RNG_SEED_OFFSET = 10_000
#: Position diagnostics: the share of selected values at each of the first positions, then the rest.
FIRST_POSITIONS = 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """How big the study is (``--quick`` shrinks every field)."""

    sizes: tuple[tuple[int, int], ...]  # (width, blocks)
    seeds: tuple[int, ...]
    corpora: tuple[str, ...]
    arms: tuple[str, ...]
    steps: int
    batch: int
    seq: int
    lr: float
    corpus_bytes: int
    eval_batches: int
    probe_windows: int
    warmup_steps: int
    checkpoint_every: int
    log_every: int


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of the study."""

    corpus: str
    width: int
    layers: int
    seed: int
    arm: str

    @property
    def name(self) -> str:
        return f"{self.corpus}_w{self.width}x{self.layers}_s{self.seed}_{self.arm}"


def jobs(plan: Plan) -> list[Job]:
    """Every run, in the order that keeps finished results coherent: size by size from the
    smallest, within a size seed by seed, all arms x corpora of one (size, seed) together."""
    return [Job(c, w, layer, s, a) for w, layer in plan.sizes for s in plan.seeds for c in plan.corpora for a in plan.arms]


def run_spec(job: Job, plan: Plan) -> RunSpec:
    options = ARMS[job.arm]
    config = None if options is None else L2EConfig(warmup_steps=plan.warmup_steps, **options)
    method: Method = "adamw" if config is None else ("memel" if config.inhibition == "memel" else "l2e")
    return RunSpec(method=method, shape=BASE_SHAPE, steps=plan.steps, batch_size=plan.batch, seq_len=plan.seq,
                   lr=plan.lr, seed=job.seed, width=job.width, layers=job.layers, l2e=config,
                   eval_every=0, eval_batches=plan.eval_batches)


def run_job(job: Job, plan: Plan, corpus: Corpus, out: pathlib.Path,
            log: Callable[[str], None] = print, stop_after: int | None = None) -> dict[str, Any] | None:
    """Train (or resume) and probe one run; write and return its result (``None`` if stopped).

    ``stop_after``: leave after this many steps with only the checkpoint written (tests use it
    to play a killed study).
    """
    path = out / "runs" / f"{job.name}.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    ckpt = out / "checkpoints" / f"{job.name}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    spec = run_spec(job, plan)
    run = setup(spec)
    state = _resume(ckpt, run, log, job)
    windows = batches(corpus.train, batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.seed)
    for _ in range(state["step"]):  # replay the data order up to the checkpoint
        next(windows)
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    for step in range(state["step"] + 1, spec.steps + 1):
        state["train_loss"].append(float(train_step(run, next(windows))))
        state["step"] = step
        if step % plan.log_every == 0 or step == spec.steps:
            _log_progress(log, job, step, spec.steps, state, time.perf_counter() - start_wall)
        if step % plan.checkpoint_every == 0 and step < spec.steps:
            _save(ckpt, run, state, time.process_time() - start_cpu)
        if stop_after is not None and step >= stop_after:
            _save(ckpt, run, state, time.process_time() - start_cpu)
            return None
    result = _result(job, plan, run, corpus, state)
    result["cpu_s"] = state["cpu_s"] + time.process_time() - start_cpu
    _write_json(path, result)
    ckpt.unlink(missing_ok=True)
    return result


def _resume(ckpt: pathlib.Path, run: RunResult, log: Callable[[str], None], job: Job) -> dict[str, Any]:
    if not ckpt.exists():
        # The random control draws from the global RNG: seed it per run, or a run would depend
        # on whatever its worker process ran before.
        torch.manual_seed(RNG_SEED_OFFSET + run.spec.seed)
        return {"step": 0, "train_loss": [], "cpu_s": 0.0, "resumed_from": []}
    meta = load_checkpoint(ckpt, run.optimizer, model=run.model, scheduler=run.scheduler)
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(meta["rng"])), dtype=torch.uint8))
    log(f"{job.name}: resumed at step {meta['step']} from {ckpt}")
    return {"step": int(meta["step"]), "train_loss": list(meta["train_loss"]), "cpu_s": float(meta["cpu_s"]),
            "resumed_from": [*meta["resumed_from"], int(meta["step"])]}


def _save(ckpt: pathlib.Path, run: RunResult, state: dict[str, Any], cpu_since_start: float) -> None:
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    meta = {**state, "cpu_s": state["cpu_s"] + cpu_since_start, "rng": rng}
    save_checkpoint(ckpt, run.optimizer, model=run.model, scheduler=run.scheduler, metadata=meta)


def _log_progress(log: Callable[[str], None], job: Job, step: int, steps: int, state: dict[str, Any], wall: float) -> None:
    done = step - (state["resumed_from"][-1] if state["resumed_from"] else 0)
    per_step = wall / max(done, 1)
    recent = state["train_loss"][-50:]
    log(f"{job.name}: step {step}/{steps} loss {statistics.fmean(recent):.3f} "
        f"{per_step:.3f} s/step, run ETA {_clock((steps - step) * per_step)}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:d}:{minutes % 60:02d}:{secs:02d}"


def _result(job: Job, plan: Plan, run: RunResult, corpus: Corpus, state: dict[str, Any]) -> dict[str, Any]:
    spec = run.spec
    params = dict(run.model.named_parameters())
    embedding = sum(p.numel() for n, p in params.items() if n.split(".")[-2] in ("embed_in", "embed_out"))
    total = sum(p.numel() for p in params.values())
    result: dict[str, Any] = {
        **dataclasses.asdict(job), "name": job.name, "params": total, "non_embedding_params": total - embedding,
        "tokens": spec.steps * spec.batch_size * spec.seq_len, "steps": spec.steps,
        "val_loss": evaluate(run.model, corpus.val, spec),
        "final_train_loss": statistics.fmean(state["train_loss"][-50:]),
        "train_loss_every_50": state["train_loss"][49::50], "resumed_from": state["resumed_from"],
    }
    result.update(probe_run(run, corpus, plan))
    return result


def probe_run(run: RunResult, corpus: Corpus, plan: Plan) -> dict[str, Any]:
    """Monosemanticity of the trained model, and where the run's rule would select on the probe."""
    assert corpus.val_features is not None, "the scaling study needs a labelled corpus"
    ids, labels = _probe.probe_windows(corpus.val, corpus.val_features, count=plan.probe_windows,
                                       seq_len=plan.seq, seed=1234)
    names = discover_sites(run.model, "all")
    zs = dict(zip(names, _probe.mlp_activations(run.model, ids)))
    phis = [_probe.probe_scores(z) for z in zs.values()]
    flat = labels.reshape(-1)
    summaries = [_probe.layer_summary(phi, flat, len(corpus.feature_names)) for phi in phis]
    out: dict[str, Any] = {
        "feature_specific_ms": statistics.fmean(s["feature_specific_ms"] for s in summaries),
        "ks": statistics.fmean(s["ks"] for s in summaries),
        "high_ms_share": statistics.fmean(s["high_ms_share"] for s in summaries),
        "fkr_2pct": statistics.fmean(_probe.fkr_curve(phi, flat, [0.02])[0] for phi in phis),
        "per_layer": summaries,
        "feature_names": list(corpus.feature_names),
    }
    if isinstance(run.optimizer, L2EWrapper):
        out.update(_selection_positions(run.optimizer, zs, ids.shape[0]))
    return out


@torch.no_grad()
def _selection_positions(opt: L2EWrapper, zs: dict[str, torch.Tensor], samples: int) -> dict[str, Any]:
    """Apply each site's final statistics and threshold, with the run's own retrieval, to the probe
    activations: the share of the selection at each of the first positions (and the rest)."""
    config = opt.config
    shares = []
    for name, site in opt.sites.items():
        z = zs[name]  # [samples * seq, N]
        phi = monosemanticity_scores(z, site.mean, site.var, eps=config.eps)
        selected = retrieve(phi, config.resolved_retrieval, site.threshold, config.ratio,
                            config.memel_topk, samples, None)
        shares.append(position_shares(selected.reshape(samples, -1, z.shape[-1]), FIRST_POSITIONS))
    mean = torch.stack(shares).mean(0)
    fractions = [float(site.selected_fraction) for site in opt.sites.values()]
    return {"position_shares": mean.tolist(), "first_positions": FIRST_POSITIONS,
            "selected_fraction_last_step": statistics.fmean(fractions)}


def _write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a killed worker never leaves a half result that would be skipped
