"""The benchmark model: a GPT-NeoX with the Pythia-70M shape and a byte vocabulary, built locally."""

from __future__ import annotations

import torch
from torch import nn

#: Pythia-70M: hidden 512, 6 layers, 8 heads, intermediate 2048 (the vocabulary here is bytes).
PYTHIA_70M = {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048}
#: A tiny model of the same family for smoke runs.
TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256}
VOCAB = 256


def gpt_neox(shape: dict[str, int], *, seq_len: int, seed: int = 0) -> nn.Module:
    """A freshly initialised GPT-NeoX causal LM of ``shape`` (no download)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=max(seq_len, 16), **shape)
    model = GPTNeoXForCausalLM(config)
    model.train()
    return model


def byte_batches(batch: int, seq_len: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` batches of real text bytes (the interpreter's standard library sources)."""
    import pathlib
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    need = batch * seq_len * count
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= need + seq_len:
            break
    ids = torch.tensor(list(data), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=g)
        out.append(torch.stack([ids[s : s + seq_len] for s in starts.tolist()]))
    return out


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy."""
    logits = model(input_ids=ids[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class _PlainBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class PlainLM(nn.Module):
    """Embedding, pre-norm MLP blocks, head: a torch-only stand-in for smoke runs (no transformers
    import, which costs seconds of a CI budget per subprocess)."""

    def __init__(self, width: int = 64, layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(_PlainBlock(width) for _ in range(layers))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> "_Logits":
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return _Logits(self.head(x))


class _Logits:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
