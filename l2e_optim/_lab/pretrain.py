"""Pretraining GPT-NeoX (Pythia-shaped, random init) on byte tokens with AdamW, L2E or MEmeL.

One loop for every method: the same seed gives the same initial weights and the same data order,
so runs differ only by the optimizer wrapper. Timing covers forward, backward, clipping, the
optimizer and scheduler steps; the loss is read on the host only after the timer stops.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._src.config import L2EConfig
from .._src.wrapper import L2EWrapper
from .corpus import Corpus, batches
from .zoo import build_model, lm_loss

Method = Literal["adamw", "l2e", "memel"]
METHODS: tuple[Method, ...] = ("adamw", "l2e", "memel")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One pretraining run.

    Attributes:
        method: ``"adamw"`` (plain AdamW), ``"l2e"`` or ``"memel"`` (``L2EWrapper(AdamW)``).
        shape: a :data:`~l2e_optim._lab.zoo.MODEL_SHAPES` name.
        steps: optimizer steps.
        batch_size, seq_len: windows per step and tokens per window.
        lr: peak AdamW learning rate (linear warm-up over 10% of steps, then cosine to 10%).
        seed: initial weights and data order (equal across methods by design).
        device: torch device string.
        l2e: wrapper configuration; ``None`` uses the defaults with ``inhibition=method``.
        width, layers: overrides of the named shape.
        eval_every: validation every this many steps (and at the end); 0 = only at the end.
        eval_batches: validation batches per evaluation (the same windows every time).
    """

    method: Method
    shape: str = "tiny"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0
    device: str = "cpu"
    l2e: L2EConfig | None = None
    width: int | None = None
    layers: int | None = None
    eval_every: int = 100
    eval_batches: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {METHODS}.")
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every} must be >= 0 (0 = only at the end).")

    def config(self) -> L2EConfig | None:
        """The wrapper configuration (``None`` for AdamW)."""
        if self.method == "adamw":
            return None
        return self.l2e if self.l2e is not None else L2EConfig(inhibition=self.method)


@dataclasses.dataclass
class RunResult:
    """What a run produced; filled in step by step (``on_step`` sees it growing).

    Attributes:
        spec: the run's :class:`RunSpec`.
        model: the trained model (train mode; hooks still attached for wrapped runs).
        optimizer: the :class:`L2EWrapper` or the plain AdamW.
        scheduler: the learning-rate scheduler (for checkpoints).
        train_loss: training loss per step.
        val_loss: ``(step, loss)`` per evaluation.
        step_seconds: wall time of each step (forward to scheduler step).
        thresholds: per site, the threshold after each step (empty for AdamW).
        selected_fraction: per site, the fraction of values over the threshold per step.
        tokens_per_second: training tokens over step time, excluding the first step (warm-up).
        steps_done: steps completed (less than ``spec.steps`` if interrupted).
    """

    spec: RunSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    thresholds: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    selected_fraction: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    tokens_per_second: float = 0.0
    steps_done: int = 0


def lr_lambda(steps: int) -> Callable[[int], float]:
    """Linear warm-up over 10% of ``steps``, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def setup(spec: RunSpec) -> RunResult:
    """Build the model, optimizer and scheduler of ``spec`` (an empty :class:`RunResult`)."""
    model: nn.Module = build_model(spec.shape, seed=spec.seed, width=spec.width, layers=spec.layers)
    model.to(torch.device(spec.device))
    model.train()
    base = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    config = spec.config()
    optimizer: torch.optim.Optimizer = base if config is None else L2EWrapper(base, model, config=config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.steps))
    result = RunResult(spec=spec, model=model, optimizer=optimizer, scheduler=scheduler)
    if isinstance(optimizer, L2EWrapper):
        result.thresholds = {name: [] for name in optimizer.sites}
        result.selected_fraction = {name: [] for name in optimizer.sites}
    return result


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, spec: RunSpec) -> float:
    """Mean validation loss over ``spec.eval_batches`` fixed windows (eval mode, no hooks run)."""
    was_training = model.training
    model.eval()
    windows = batches(tokens, batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.seed + 1)
    total = 0.0
    for _ in range(spec.eval_batches):
        total += float(lm_loss(model, next(windows).to(spec.device)))
    model.train(was_training)
    return total / spec.eval_batches


def train(
    spec: RunSpec,
    corpus: Corpus,
    *,
    progress: bool = True,
    on_step: Callable[[int, RunResult], None] | None = None,
) -> RunResult:
    """Pretrain one model; every method sees the same initial weights and the same windows.

    Args:
        spec: the run.
        corpus: byte tokens (train windows are drawn from ``corpus.train``, validation from
            ``corpus.val``).
        progress: show a tqdm progress bar (when tqdm is installed) on stderr.
        on_step: called as ``on_step(step, result)`` after each step (1-based); an exception
            raised there (e.g. KeyboardInterrupt) stops training and propagates.
    """
    result = setup(spec)
    windows = batches(corpus.train, batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.seed)
    bar = _progress_bar(spec, progress)
    cuda = torch.device(spec.device).type == "cuda"
    try:
        for step in range(1, spec.steps + 1):
            window = next(windows).to(spec.device)
            start = time.perf_counter()
            loss = train_step(result, window)
            if cuda:  # the one sync the timer needs; nothing inside the step waits on the device
                torch.cuda.synchronize(spec.device)
            result.step_seconds.append(time.perf_counter() - start)
            _record(result, float(loss), step, corpus)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.train_loss[-1]:.3f}", refresh=False)
            if on_step is not None:
                on_step(step, result)
    finally:
        if bar is not None:
            bar.close()
    return result


def train_step(result: RunResult, window: Tensor) -> Tensor:
    """One optimizer step on ``window`` (forward, backward, clipping, optimizer and scheduler
    steps, grads cleared); returns the detached loss (no host sync). Loops that manage their own
    steps (resumable studies) call this, so every loop trains alike."""
    loss = lm_loss(result.model, window)
    torch.autograd.backward(loss)
    torch.nn.utils.clip_grad_norm_(result.model.parameters(), 1.0)
    result.optimizer.step()
    result.scheduler.step()
    result.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _record(result: RunResult, loss: float, step: int, corpus: Corpus) -> None:
    spec = result.spec
    result.train_loss.append(loss)
    result.steps_done = step
    if isinstance(result.optimizer, L2EWrapper):
        for name, site in result.optimizer.sites.items():
            result.thresholds[name].append(float(site.threshold))
            result.selected_fraction[name].append(float(site.selected_fraction))
    timed = result.step_seconds[1:] if len(result.step_seconds) > 1 else result.step_seconds
    result.tokens_per_second = spec.batch_size * spec.seq_len * len(timed) / max(sum(timed), 1e-12)
    if step == spec.steps or (spec.eval_every and step % spec.eval_every == 0):
        result.val_loss.append((step, evaluate(result.model, corpus.val, spec)))


def _progress_bar(spec: RunSpec, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=spec.steps, desc=f"{spec.method:>5}", unit="step", leave=True, dynamic_ncols=True)
