"""SIGKILL during save_checkpoint: the target always holds the old or the new complete file, and
the temporary files of killed saves are removed by the next save (the loader never reads them).

A child process (forked, so it starts at once) saves in a loop, each save a new version (every weight = the version number);
the parent kills it at a random moment (seeded), then loads the target, which must be complete
(its checksums verify every byte) and hold a version no older than the last one seen.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import random
import signal
import time
from typing import Any

import pytest
import torch

from l2e_optim import L2EConfig, L2EWrapper, load_checkpoint, save_checkpoint
from l2e_optim._lab.zoo import PlainLM



def saver(path: str, version: int, ready: Any) -> None:
    """The child: a save per version, forever (until SIGKILL). Forked: no interpreter start-up."""
    model, opt = build()
    ready.set()
    while True:
        version += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(version)
        save_checkpoint(path, opt, model=model, metadata={"version": version})


def build() -> tuple[PlainLM, L2EWrapper]:
    model = PlainLM(layers=2, width=128, vocab=512)
    return model, L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config=L2EConfig(layers="all"))


def temporaries(folder: pathlib.Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def kill_during_saves(folder: pathlib.Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    path = folder / "ckpt.safetensors"
    model, opt = build()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # version 0: a kill before the first child's save completes loads this
    save_checkpoint(path, opt, model=model, metadata={"version": 0})
    last, left_behind = 0, 0
    fork = multiprocessing.get_context("fork")
    for _ in range(kills):
        ready = fork.Event()
        child = fork.Process(target=saver, args=(str(path), last, ready))
        child.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, 0.3))
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        left_behind = max(left_behind, len(temporaries(folder)))
        fresh_model, fresh = build()
        version = load_checkpoint(path, fresh, model=fresh_model)["version"]  # complete: checksums pass
        assert version >= last
        assert all(torch.all(p == version) for p in fresh_model.parameters())
        last = version
    assert last > 0, "no save in the child ever completed; the kills tested nothing"
    assert left_behind > 0, "no kill landed mid-save; the kills tested nothing"
    save_checkpoint(path, opt, model=model, metadata={"version": last + 1})
    assert temporaries(folder) == []  # the killed saves' temporary files are gone


def test_sigkill_during_save_leaves_the_old_or_the_new_file(tmp_path: pathlib.Path) -> None:
    kill_during_saves(tmp_path, kills=8, seed=0)


@pytest.mark.slow
def test_sigkill_during_save_forty_times(tmp_path: pathlib.Path) -> None:
    kill_during_saves(tmp_path, kills=40, seed=1)


def test_a_live_writers_temporary_file_is_left_alone(tmp_path: pathlib.Path) -> None:
    """Only temporaries of dead writers on this host are removed (another may be mid-save)."""
    from l2e_optim._src.checkpoint_io import _temporary_name, remove_stale_temporaries

    path = str(tmp_path / "ckpt.safetensors")
    live = tmp_path / _temporary_name(path, os.getppid())  # the test runner's parent: alive
    other_host = tmp_path / ".ckpt.safetensors.elsewhere.1.abcd.tmp"
    for name in (live, other_host):
        name.write_bytes(b"partial")
    assert remove_stale_temporaries(path) == []
    assert sorted(temporaries(tmp_path)) == sorted([live.name, other_host.name])
