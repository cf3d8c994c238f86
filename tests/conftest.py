"""Shared fixtures: tiny real models (built from configs, no downloads) and real text batches."""

from __future__ import annotations

import pathlib
import sysconfig
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

VOCAB = 256  # byte-level tokens

# Tiny models run fastest on one thread, and a second OpenMP thread spinning on a loaded 2-core
# machine can slow the suite several-fold.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def stdlib_bytes(limit: int = 400_000) -> torch.Tensor:
    """Real text that exists on every machine: the interpreter's own standard-library sources."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.tensor(list(b"".join(chunks)[:limit]), dtype=torch.long)


@pytest.fixture(scope="session")
def corpus() -> torch.Tensor:
    return stdlib_bytes()


def batches(corpus: torch.Tensor, batch: int, seq: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random windows of the corpus, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([corpus[s : s + seq] for s in starts.tolist()])


def tiny_gpt_neox(layers: int = 4, hidden: int = 32, seed: int = 0) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
    )
    return GPTNeoXForCausalLM(config)


def tiny_gpt2(layers: int = 4, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128))


def tiny_llama(layers: int = 4, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def tiny_bert(layers: int = 4, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    return BertForMaskedLM(config)


class PlainBlock(nn.Module):
    """A pre-norm transformer-style block written with plain torch modules."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class PlainLM(nn.Module):
    """Embedding, a stack of PlainBlocks, a head: the smallest 'transformer MLP' model."""

    def __init__(self, layers: int = 4, width: int = 16, vocab: int = VOCAB, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(PlainBlock(width) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "gpt_neox": tiny_gpt_neox,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "bert": tiny_bert,
    "plain": PlainLM,
}
