"""The ``l2e-optim`` command line: ``demo`` (pretrain three ways, compare) and ``analyze``.

A thin shell: argument parsing, clean error messages for bad input, files. The work is done by
``corpus``, ``pretrain``, ``analysis`` and ``report``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .analysis import analyze
from .corpus import Corpus, DataError, load_corpus
from .prose import DATA_NAMES, load_named
from .._src.discovery import SiteDiscoveryError
from .demo_summary import demo_summary, run_curves
from .interrupt import StepBoundaryInterrupt, StopRequested
from .model_io import InputError, load_causal_lm, load_tokenizer, tokenize_bytes, token_renderer
from .pretrain import METHODS, RunResult, RunSpec, train
from .report import analysis_png, analysis_table, check_writable, demo_png, demo_table, write_json
from .zoo import MODEL_SHAPES, UnknownModelError

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
DESCRIPTION = (
    "L2E: inhibit monosemantic neurons during pretraining. 'demo' pretrains a small GPT-NeoX "
    "three ways (AdamW, L2E, MEmeL) on local text and compares loss, speed and monosemanticity; "
    "'analyze' measures the monosemanticity of a local causal LM. See docs/demo.md."
)
SMOKE = {"steps": 4, "batch_size": 2, "seq_len": 32, "max_bytes": 40_000, "width": 32, "layers": 2,
         "eval_every": 2, "eval_batches": 1, "analysis_tokens": 512}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m l2e_optim``."""
    parser = argparse.ArgumentParser(prog="l2e-optim", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="pretrain GPT-NeoX with AdamW, L2E and MEmeL and compare")
    demo.add_argument("--data", action="append", metavar="PATH",
                      help=f"text files or folders (repeatable), or one built-in corpus: {DATA_HELP}")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200)")
    demo.add_argument("--model", default="tiny", help=f"model shape: {', '.join(MODEL_SHAPES)}")
    demo.add_argument("--width", type=int, default=None, help="override the shape's hidden size")
    demo.add_argument("--layers", type=int, default=None, help="override the shape's number of blocks")
    demo.add_argument("--batch-size", type=int, default=None, help="windows per step (default 16)")
    demo.add_argument("--seq-len", type=int, default=None, help="bytes per window (default 128)")
    demo.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    demo.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of adamw,l2e,memel")
    demo.add_argument("--max-bytes", type=int, default=None, help="corpus size cap in bytes (default 1,000,000)")
    demo.add_argument("--smoke", action="store_true", help="tiny sizes for CI (seconds, not minutes)")
    _common(demo, "runs/demo")
    ana = sub.add_parser("analyze", help="monosemanticity analysis of a local causal LM")
    ana.add_argument("target", metavar="MODEL_DIR_OR_CHECKPOINT",
                     help="a folder with config.json and weights, or a .safetensors file beside a config.json")
    ana.add_argument("--data", action="append", metavar="PATH",
                     help=f"text files or folders (repeatable), or one built-in corpus: {DATA_HELP}")
    ana.add_argument("--seq-len", type=int, default=128, help="bytes per analysis window")
    ana.add_argument("--tokens", type=int, default=8192, help="tokens analysed (bytes, or tokenizer tokens)")
    ana.add_argument("--top", type=int, default=8, help="most monosemantic neurons listed")
    ana.add_argument("--max-bytes", type=int, default=1_000_000,
                     help="corpus size cap in bytes (default 1,000,000: the demo's split)")
    _common(ana, None)
    return parser


DATA_HELP = ("code (this Python's standard library, the default), english (its docstrings, comments and "
             "pydoc topics) or mixed (both; features prose / code)")


def load_data(data: Sequence[str] | None, *, max_bytes: int) -> Corpus:
    """``--data``: one built-in corpus name (:data:`DATA_NAMES`, unless a file of that name
    exists: then the file), else the user's files and folders (``None``: the code corpus)."""
    if data is not None and len(data) == 1 and data[0] in DATA_NAMES and not Path(data[0]).exists():
        return load_named(data[0], max_bytes=max_bytes)
    return load_corpus(data, max_bytes=max_bytes)


def _common(parser: argparse.ArgumentParser, out: str | None) -> None:
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    where = out or "runs/analyze/<name of the target>"
    parser.add_argument("--out", default=out, help=f"output folder (default {where})")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: small matrices gain little and shared cores thrash)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None, *, on_step: Callable[[int, RunResult], None] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted).

    ``on_step`` is passed to every training run (tests use it to simulate Ctrl-C).
    """
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()  # restored on the way out: main() may run inside a host process
    try:
        _check_device(args.device)
        if args.threads < 1:
            raise InputError(f"--threads={args.threads} must be >= 1.")
        if args.device == "cpu":
            torch.set_num_threads(args.threads)
        if args.command == "demo":
            return run_demo(args, on_step)
        return run_analyze(args)
    except (InputError, DataError, UnknownModelError, SiteDiscoveryError, OSError) as error:
        print(f"l2e-optim {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"l2e-optim {args.command}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(threads)


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise InputError(f"--device={device!r} is not a torch device ({error}); use cpu or cuda.") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device={device!r}: no CUDA GPU is available here; use --device cpu.")


# -- demo -----------------------------------------------------------------------------------
def demo_specs(args: argparse.Namespace) -> list[RunSpec]:
    """The three (or chosen) runs, identical but for the method."""
    smoke = SMOKE if args.smoke else {}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"--methods {args.methods!r}: use a comma-separated subset of {', '.join(METHODS)}.")
    if args.model not in MODEL_SHAPES:
        raise InputError(f"unknown model {args.model!r}; known models: {', '.join(MODEL_SHAPES)}.")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr={args.lr} must be a finite number > 0, e.g. --lr 3e-3.")
    steps = _pick(args.steps, smoke.get("steps"), 200, "--steps")
    specs = [
        RunSpec(
            method=method,
            shape=args.model,
            steps=steps,
            batch_size=_pick(args.batch_size, smoke.get("batch_size"), 16, "--batch-size"),
            seq_len=_pick(args.seq_len, smoke.get("seq_len"), 128, "--seq-len"),
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            width=_pick(args.width, smoke.get("width"), None, "--width"),
            layers=_pick(args.layers, smoke.get("layers"), None, "--layers"),
            eval_every=int(smoke.get("eval_every", max(1, steps // 4))),
            eval_batches=int(smoke.get("eval_batches", 8)),
        )
        for method in methods
    ]
    return specs


def _pick(flag: Any, smoke: Any, default: Any, name: str) -> Any:
    if flag is not None:
        if isinstance(flag, int) and flag < 1:
            raise InputError(f"{name}={flag} must be >= 1.")
        return flag
    return smoke if smoke is not None else default


def run_demo(args: argparse.Namespace, on_step: Callable[[int, RunResult], None] | None = None) -> int:
    """Train each method, checkpoint it, analyse it; table, JSON and PNG at the end."""
    with StepBoundaryInterrupt() as interrupt:  # from the start: a Ctrl-C while loading stops at step 1
        return _demo(args, on_step, interrupt)


def _demo(
    args: argparse.Namespace,
    on_step: Callable[[int, RunResult], None] | None,
    interrupt: StepBoundaryInterrupt,
) -> int:
    start = time.perf_counter()  # wall time covers data loading, training, analysis and files
    out = Path(args.out)
    specs = demo_specs(args)
    check_writable(out)
    max_bytes = _pick(args.max_bytes, SMOKE["max_bytes"] if args.smoke else None, 1_000_000, "--max-bytes")
    corpus = load_data(args.data, max_bytes=max_bytes)
    if corpus.val.numel() < specs[0].seq_len + 2:
        raise InputError(f"the validation split has {corpus.val.numel()} bytes, fewer than one window; "
                         "give more text or a smaller --seq-len.")
    results: dict[str, RunResult] = {}
    latest: list[RunResult] = []

    def track(step: int, result: RunResult) -> None:
        latest[:] = [result]
        try:
            if on_step is not None:
                on_step(step, result)
        except KeyboardInterrupt as error:  # raised between steps: as clean as Ctrl-C's flag
            raise StopRequested from error
        interrupt.check()

    try:
        for spec in specs:
            results[spec.method] = train(spec, corpus, progress=not args.no_progress, on_step=track)
            save_run(out / spec.method, results[spec.method], interrupted=False)
            latest.clear()
    except StopRequested:
        return _interrupted(out, latest[0] if latest else None)
    except KeyboardInterrupt:
        return _interrupted(out, None)
    interrupt.check()  # Ctrl-C during the last save: every run is saved; skip the analysis
    analysis_tokens = int(SMOKE["analysis_tokens"]) if args.smoke else 8192
    summary = demo_summary(args, corpus.sources, results, corpus, analysis_tokens, 0.0)
    note = demo_png(out / "demo.png", summary, run_curves(results, summary))
    summary["wall_seconds"] = time.perf_counter() - start
    write_json(out / "summary.json", summary)
    print(demo_table(summary))
    print(f"\nwall time {summary['wall_seconds']:.1f} s; wrote {out / 'summary.json'}"
          + (f" and {out / 'demo.png'}" if note is None else f"; {note}"))
    return EXIT_OK


def _interrupted(out: Path, run: RunResult | None) -> int:
    if run is None:
        print("\nstopped at once: finished runs keep their checkpoints; the run in progress was not "
              "saved (it may have stopped mid-step).", file=sys.stderr)
    else:
        save_run(out / run.spec.method, run, interrupted=True)
        print(f"\ninterrupted at step {run.steps_done}/{run.spec.steps} of {run.spec.method!r}; "
              f"checkpoint kept in {out / run.spec.method}", file=sys.stderr)
    return EXIT_INTERRUPTED


def save_run(folder: Path, run: RunResult, *, interrupted: bool) -> None:
    """``model.safetensors`` + ``config.json`` (loadable by from_pretrained) and the full checkpoint."""
    from safetensors.torch import save_file

    from .._src.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in run.model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "model.safetensors")
    getattr(run.model, "config").to_json_file(str(folder / "config.json"))
    meta = {"method": run.spec.method, "steps_done": run.steps_done, "interrupted": interrupted}
    save_checkpoint(folder / "checkpoint.safetensors", run.optimizer, model=run.model,
                    scheduler=run.scheduler, metadata=meta)


# -- analyze --------------------------------------------------------------------------------
def default_analysis_folder(target: Path) -> Path:
    """``runs/analyze/<name>``: the folder's name, or ``<folder>-<file stem>`` for a file, so that
    analyses of different targets (``runs/demo/l2e``, ``runs/demo/adamw``) do not overwrite each other."""
    resolved = target.resolve()
    name = resolved.name if target.is_dir() or not target.suffix else f"{resolved.parent.name}-{resolved.stem}"
    return Path("runs/analyze") / (name or "model")


def run_analyze(args: argparse.Namespace) -> int:
    """Load a local model, analyse it on byte tokens; table, JSON and PNG."""
    out = Path(args.out) if args.out is not None else default_analysis_folder(Path(args.target))
    model = load_causal_lm(Path(args.target))
    check_writable(out)
    for name in ("seq_len", "tokens", "top"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    model.to(torch.device(args.device))
    corpus = load_data(args.data, max_bytes=args.max_bytes)
    tokens = corpus.val if corpus.val.numel() >= args.seq_len else corpus.train
    features = corpus.val_features if tokens is corpus.val else corpus.train_features
    tokenizer = load_tokenizer(Path(args.target))
    render = None
    if tokenizer is not None:  # sub-word model: its own tokens, each labelled by its last byte
        tokens, features = tokenize_bytes(tokenizer, tokens, features, max_bytes=16 * args.tokens)
        render = token_renderer(tokenizer)
    found = analyze(model, tokens, features, seq_len=args.seq_len, max_tokens=args.tokens,
                    top_neurons=args.top, device=args.device, render=render, feature_names=corpus.feature_names)
    unit = "bytes" if tokenizer is None else "tokenizer tokens"
    result = {"target": str(args.target), "token_unit": unit, **found.to_dict()}
    write_json(out / "analysis.json", result)
    note = analysis_png(out / "analysis.png", result)
    print(analysis_table(result))
    print(f"\nwrote {out / 'analysis.json'}" + (f" and {out / 'analysis.png'}" if note is None else f"; {note}"))
    return EXIT_OK

