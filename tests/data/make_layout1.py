"""Writes layout1.safetensors and layout1.pt: L2E state in layout 1 (one top-level "l2e" entry).

Run once with an l2e_optim from before layout 2 (commit 7006437), from the repository root:
``PYTHONPATH=<old l2e_optim> python tests/data/make_layout1.py``. test_dcp.py builds the same
model and optimizer with :func:`build` and checks that today's l2e_optim still loads both files.
Self-contained (torch and l2e_optim only), so that any version can run it.
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

from l2e_optim import L2EConfig, L2EWrapper, save_checkpoint

HERE = pathlib.Path(__file__).resolve().parent
VOCAB = 23


class TinyLM(nn.Module):
    """Embedding, 2 residual MLP blocks (sites: ``blocks.<i>.down``), head; ~1.5k parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 12), "down": nn.Linear(12, 8)}) for _ in range(2))
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block["down"](nn.functional.gelu(block["up"](x)))
        out: torch.Tensor = self.head(x)
        return out


def build() -> tuple[TinyLM, L2EWrapper]:
    model = TinyLM()
    config = L2EConfig(strength=0.05, warmup_steps=1, ratio=0.05, layers="all")
    return model, L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), model, config=config, sites=["blocks.0.down", "blocks.1.down"])


def main() -> None:
    model, opt = build()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (4, 9), generator=generator)
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.state_dict()["l2e"]["format_version"] == 1, "run this with an l2e_optim before layout 2"
    save_checkpoint(HERE / "layout1.safetensors", opt, model=model)
    torch.save(opt.state_dict(), HERE / "layout1.pt")


if __name__ == "__main__":
    main()
