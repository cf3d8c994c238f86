"""Seeded fuzzing of a real checkpoint (tiny GPT-NeoX, AdamW, L2E, LambdaLR).

Each variant of the file must either be refused with CheckpointError, leaving model, optimizer
and scheduler exactly as they were, or load a state that trains a few steps without NaN/inf.
Variants: bit flips in the header and in the tensor data, truncations, edits of the safetensors
header (dtype, shape, offsets, metadata JSON), and absurd values written into every kind of
field, as a writer would write them (checksums recomputed, so the value checks, not the
checksum, must catch them).

Not fuzzed, by design (docs/checkpointing.md, "What is not validated"): huge *finite* model
weights and learning rates; no magnitude is wrong for every model, and such a file is a
deliberate edit (a random corruption of its bytes is caught by the checksum).
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from l2e_optim import CheckpointError, load_checkpoint, save_checkpoint
from l2e_optim._src.checkpoint_io import checksum
from conftest import assert_identical
from test_checkpoint import CASES, BEFORE, Run, build, data, read, snapshot, train

Variant = tuple[str, bytes]
ABSURD_NUMBERS: list[Any] = [math.nan, math.inf, -math.inf, -1, -1e30, 1e30, 0, 2**63 - 1, 2**70, -(2**63)]
ABSURD_OTHER: list[Any] = [None, True, "x", [], {}, [1, 2], {"a": 1}, [[[[[[1]]]]]]]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "X9"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    run = build(CASES[0], seed=0)
    train(run, data(BEFORE))
    path = tmp_path_factory.mktemp("fuzz") / "good.safetensors"
    save_checkpoint(path, run.opt, model=run.model, scheduler=run.sched, metadata={"step": BEFORE, "tag": "good"})
    return path.read_bytes()


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


# -- variant makers: each takes the good file and an RNG ------------------------------------------
def flip_header(raw: bytes, rng: random.Random) -> Variant:
    n = int.from_bytes(raw[:8], "little")
    at = rng.randrange(0, 8 + n)
    out = bytearray(raw)
    out[at] ^= 1 << rng.randrange(8)
    return f"flip-header@{at}", bytes(out)


def flip_data(raw: bytes, rng: random.Random) -> Variant:
    n = int.from_bytes(raw[:8], "little")
    at = rng.randrange(8 + n, len(raw))
    out = bytearray(raw)
    out[at] ^= 1 << rng.randrange(8)
    return f"flip-data@{at}", bytes(out)


def truncate(raw: bytes, rng: random.Random) -> Variant:
    at = rng.randrange(0, len(raw))
    return f"truncate@{at}", raw[:at]


def edit_tensor_entry(raw: bytes, rng: random.Random) -> Variant:
    """dtype, shape or data_offsets of one tensor in the safetensors header."""
    header, body = split(raw)
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[key]
    what = rng.choice(["dtype", "shape", "offsets"])
    if what == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif what == "shape":
        shape = entry["shape"]
        choice = rng.randrange(4)
        if choice == 0 and len(shape) > 1:
            entry["shape"] = list(reversed(shape))
        elif choice == 1:
            entry["shape"] = shape + [1]
        elif choice == 2 and shape:
            entry["shape"] = shape[:-1]
        else:
            entry["shape"] = [rng.choice([0, 1, 2, 10**12, -1])] + shape[1:]
    else:
        begin, end = entry["data_offsets"]
        delta = rng.choice([-8, -4, -1, 1, 4, 8, 10**9])
        entry["data_offsets"] = rng.choice([[begin + delta, end + delta], [begin, end + delta], [end, begin]])
    return f"header-{what}:{key}", join(header, body)


def _leaves(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, path + (i,))
    yield path


def _set(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    tree[path[0]] = _set(tree[path[0]], path[1:], value)
    return tree


def edit_metadata(raw: bytes, rng: random.Random) -> Variant:
    """An absurd value at a random place of a random metadata JSON entry (or the entry itself)."""
    header, body = split(raw)
    meta = header["__metadata__"]
    key = rng.choice(sorted(k for k in meta if k != "checksums"))
    try:
        tree = json.loads(meta[key])
    except ValueError:
        tree = meta[key]
    where = rng.choice(list(_leaves(tree)))
    value = rng.choice(ABSURD_NUMBERS + ABSURD_OTHER)
    if rng.random() < 0.1:
        meta[key] = rng.choice(["", "{", "null", "[" * 600 + "]" * 600, json.dumps(value)])
    else:
        meta[key] = json.dumps(_set(tree, where, value))
    return f"metadata:{key}:{where}={value!r}", join(header, body)


def absurd_tensor(raw: bytes, rng: random.Random, key: str | None = None) -> Variant:
    """Absurd values in one tensor, written as a writer would (checksums recomputed)."""
    tensors, meta = _read_bytes(raw)
    key = key or rng.choice(sorted(tensors))
    value = tensors[key].clone()
    if value.dtype == torch.bool:
        return f"absurd:{key}:bool-skipped", raw
    if value.is_floating_point():
        fill = rng.choice([math.nan, math.inf, -math.inf, -1.0, 0.0, -1e30, 1e30, 3e38])
        if key.startswith("model.") or key.endswith(".exp_avg"):
            fill = rng.choice([math.nan, math.inf, -math.inf])  # finite magnitudes: not validated
    else:
        fill = rng.choice([-1, -(2**62), 2**62, 2**63 - 1, 0])
    flat = value.view(-1)
    if flat.numel():
        if rng.random() < 0.5:
            flat[rng.randrange(flat.numel())] = fill
        else:
            flat.fill_(fill)
    tensors[key] = value
    return f"absurd:{key}={fill}", _write_bytes(tensors, meta)


def _read_bytes(raw: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors.torch import load

    tensors = load(raw)
    header, _ = split(raw)
    return tensors, dict(header["__metadata__"])


def _write_bytes(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {k: t.contiguous() for k, t in tensors.items()}
    meta = dict(meta, checksums=json.dumps({k: checksum(t) for k, t in tensors.items()}))
    return save(tensors, metadata=meta)


MAKERS: list[Callable[[bytes, random.Random], Variant]] = [
    flip_header, flip_data, truncate, edit_tensor_entry, edit_metadata, absurd_tensor,
]


def variants(raw: bytes, count: int, seed: int) -> Iterator[Variant]:
    rng = random.Random(seed)
    for i in range(count):
        yield MAKERS[i % len(MAKERS)](raw, rng)


def every_kind_of_tensor(raw: bytes, seed: int, count: int | None) -> Iterator[Variant]:
    """'Absurd values in every field': every L2E and scheduler tensor, and ``count`` others
    (all of them with ``count=None``), each once."""
    rng = random.Random(seed)
    keys = sorted(_read_bytes(raw)[0])
    always = [k for k in keys if k.startswith(("optimizer.l2e", "scheduler")) or ".l2e.sites." in k]
    others = [k for k in keys if k not in always]
    picked = others if count is None else rng.sample(others, min(count, len(others)))
    for key in always + picked:
        yield absurd_tensor(raw, rng, key)


# -- the property ---------------------------------------------------------------------------------
def check(name: str, blob: bytes, tmp: pathlib.Path, target: Run) -> str:
    path = tmp / "variant.safetensors"
    path.write_bytes(blob)
    before = snapshot(target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fuzzed L2E config differs: warned, and ignored
            load_checkpoint(path, target.opt, model=target.model, scheduler=target.sched)
    except CheckpointError:
        assert_identical(snapshot(target), before)
        return "refused"
    except Exception as error:  # noqa: BLE001 - the property: nothing else may escape
        raise AssertionError(f"{name}: {type(error).__name__} escaped: {error}") from error
    train(target, data(3))
    for key, value in target.model.state_dict().items():
        assert torch.isfinite(value.float()).all(), f"{name}: model.{key} not finite after training"
    for site in target.opt.sites.values():
        for key, value in site.tensors().items():
            assert torch.isfinite(value.float()).all(), f"{name}: {site.name}.{key} not finite"
    return "loaded"


def fuzz(raw: bytes, tmp: pathlib.Path, stream: Iterator[Variant]) -> dict[str, int]:
    target = build(CASES[0], seed=3)
    train(target, data(1))
    outcomes: dict[str, int] = {}
    for name, blob in stream:
        outcome = check(name, blob, tmp, target)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def test_fuzzed_checkpoints_are_refused_cleanly_or_train(source: bytes, tmp_path: pathlib.Path) -> None:
    outcomes = fuzz(source, tmp_path, variants(source, 150, seed=0))
    assert outcomes.get("refused", 0) > 100 and sum(outcomes.values()) == 150


def test_absurd_values_in_every_kind_of_tensor(source: bytes, tmp_path: pathlib.Path) -> None:
    outcomes = fuzz(source, tmp_path, every_kind_of_tensor(source, seed=0, count=40))
    assert outcomes.get("refused", 0) > 20


def test_the_unmodified_file_loads_and_trains(source: bytes, tmp_path: pathlib.Path) -> None:
    """The property's other branch is reachable: the good file loads."""
    assert fuzz(source, tmp_path, iter([("good", source)])) == {"loaded": 1}


@pytest.mark.slow
def test_fuzzed_checkpoints_many_seeds_and_every_tensor(source: bytes, tmp_path: pathlib.Path) -> None:
    fuzz(source, tmp_path, every_kind_of_tensor(source, seed=1, count=None))
    for seed in range(1, 5):
        fuzz(source, tmp_path, variants(source, 240, seed=seed))
