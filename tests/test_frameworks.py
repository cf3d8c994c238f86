"""Frameworks that own the training loop: Hugging Face Trainer, accelerate, PyTorch Lightning.

Tiny GPT-NeoX models built from configs, CPU only, no downloads, no loggers.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from conftest import batches
from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import tiny_gpt_neox

SEQ, BATCH, STEPS = 16, 4, 4
CONFIG = L2EConfig(warmup_steps=1, strength=0.05, ratio=0.05)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows(corpus: Tensor, n: int) -> list[Tensor]:
    return list(next(batches(corpus, n, SEQ, seed=1)))


def wrapped(model: nn.Module, lr: float = 1e-3) -> tuple[L2EWrapper, torch.optim.lr_scheduler.LRScheduler]:
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=lr), model, config=CONFIG)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return opt, sched


def assert_trained(opt: L2EWrapper, steps: int, tokens_per_step: int) -> None:
    assert int(opt.step_count) == steps
    for site in opt.sites.values():
        assert int(site.count) == steps * tokens_per_step
        assert bool(torch.isfinite(site.var).all()) and float(site.var.sum()) > 0


# -- Hugging Face Trainer --------------------------------------------------------------------------
def neox_for_trainer() -> nn.Module:
    """tiny_gpt_neox with a tied head: transformers 5.24's Trainer saves GPT-NeoX's untied head as
    ``embed_out.weight`` but resumes by plain ``load_state_dict``, which expects ``lm_head.weight``
    and leaves the head at its initial value (a transformers bug, not L2E's)."""
    model = tiny_gpt_neox(layers=4)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return model


def trainer_run(corpus: Tensor, out: pathlib.Path, resume: str | None) -> tuple[nn.Module, L2EWrapper]:
    from transformers import Trainer, TrainingArguments

    model = neox_for_trainer()
    opt, sched = wrapped(model)
    data = [{"input_ids": r, "labels": r} for r in rows(corpus, BATCH * STEPS)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    return model, opt


def test_hf_trainer_trains_saves_and_resumes(corpus: Tensor, tmp_path: pathlib.Path) -> None:
    full_model, full = trainer_run(corpus, tmp_path / "full", None)
    assert_trained(full, STEPS, BATCH * SEQ)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    # The Trainer's own checkpoint carries the L2E state, in the state entries of the site weights.
    records = {
        name: record for entry in saved["state"].values() for name, record in entry.get("l2e", {}).get("sites", {}).items()
    }
    assert records.keys() == full.sites.keys()
    assert all(int(record["step"]) == 2 for record in records.values())

    resumed_model, resumed = trainer_run(corpus, tmp_path / "resumed", str(checkpoint))
    assert int(resumed.step_count) == STEPS
    for name, site in full.sites.items():
        for key, value in site.tensors().items():
            torch.testing.assert_close(resumed.sites[name].tensors()[key], value, rtol=1e-5, atol=1e-6)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- accelerate ------------------------------------------------------------------------------------
def test_accelerate_prepare_trains(corpus: Tensor) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_gpt_neox(layers=4)
    opt, sched = wrapped(model)
    model, prepared, sched = accelerator.prepare(model, opt, sched)
    params = [p.detach().clone() for p in model.parameters()]
    data = iter(batches(corpus, BATCH, SEQ, seed=2))
    for _ in range(STEPS):
        batch = next(data)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        prepared.step()
        sched.step()
        prepared.zero_grad()
    assert_trained(opt, STEPS, BATCH * SEQ)
    assert any(not torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert "l2e" in prepared.state_dict()


# -- PyTorch Lightning -----------------------------------------------------------------------------
def test_lightning_configure_optimizers_trains(corpus: Tensor) -> None:
    import lightning as L

    class Module(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_gpt_neox(layers=4)
            self.opt: L2EWrapper | None = None

        def training_step(self, batch: Tensor, index: int) -> Tensor:
            return self.model(input_ids=batch, labels=batch).loss  # type: ignore[no-any-return]

        def configure_optimizers(self) -> Any:
            self.opt, sched = wrapped(self.model)
            return {"optimizer": self.opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = Module()
    params = [p.detach().clone() for p in module.parameters()]
    loader = torch.utils.data.DataLoader(rows(corpus, BATCH * STEPS), batch_size=BATCH)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert module.opt is not None
    assert_trained(module.opt, STEPS, BATCH * SEQ)
    assert any(not torch.equal(p, q) for p, q in zip(params, module.parameters()))


# -- the copy-paste snippets of docs/integrations.md run as written ------------------------------------
def doc_snippets() -> list[str]:
    doc = pathlib.Path(__file__).parent.parent / "docs" / "integrations.md"
    return [block.split("```", 1)[0] for block in doc.read_text().split("```python\n")[1:]]


@pytest.mark.parametrize("index", range(3), ids=["trainer", "accelerate", "lightning"])
def test_integration_snippet_runs(index: int, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    snippets = doc_snippets()
    assert len(snippets) == 3
    scope: dict[str, Any] = {"OUTPUT_DIR": str(tmp_path)}
    exec(compile(snippets[index], f"docs/integrations.md#{index}", "exec"), scope)
    opt = scope["lit"].l2e if "lit" in scope else scope["opt"]
    assert isinstance(opt, L2EWrapper) and int(opt.step_count) == 4
    assert all(int(site.count) > 0 for site in opt.sites.values())
    # The example must show L2E at work: steps past the warm-up, with the regularizer on.
    assert opt.config.inhibition == "l2e" and opt.config.strength > 0
    assert opt.config.warmup_steps < int(opt.step_count)
    assert "l2e/step" in capsys.readouterr().out
