"""The small models that the demo, the tests and the benchmarks share, all built locally.

- :class:`PlainLM`: embedding, pre-norm MLP blocks, head, in plain torch (no transformers import,
  which costs seconds per subprocess): the smallest model with transformer-style MLP sites.
- ``tiny_*``: real Hugging Face models (GPT-NeoX, GPT-2, Llama, BERT) from tiny configs, for
  site discovery and integration tests across model families.
- :data:`MODEL_SHAPES` and :func:`build_model`: GPT-NeoX with Pythia's shapes (random init, byte
  vocabulary), for the demo, the reproduction and the benchmarks.

transformers is imported inside the builders only: the lab's plain parts, and ``import l2e_optim``,
must not pay for it (``tests/test_layout.py``).
"""

from __future__ import annotations

import pathlib
import sysconfig
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

VOCAB = 256  # byte-level tokens

MODEL_SHAPES: dict[str, dict[str, int]] = {
    # A few-minute CPU default: 4 blocks of width 64 (about 0.2M parameters with bytes).
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256},
    # The real Pythia shapes (EleutherAI/pythia-*), with a byte vocabulary unless given.
    "pythia-14m": {"hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512},
    "pythia-70m": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048},
    "pythia-160m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "pythia-410m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "pythia-1.4b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 8192},
}
"""Named model shapes: hidden size, blocks, heads and MLP width (GPT-NeoX, Pythia's settings)."""


class UnknownModelError(ValueError):
    """A model shape name that is not in :data:`MODEL_SHAPES`, or a bad width/layers override."""


def model_config(
    shape: str,
    *,
    vocab_size: int = VOCAB,
    max_positions: int = 2048,
    width: int | None = None,
    layers: int | None = None,
) -> GPTNeoXConfig:
    """The ``GPTNeoXConfig`` of a named shape (``width``/``layers`` override it)."""
    from transformers import GPTNeoXConfig

    if shape not in MODEL_SHAPES:
        raise UnknownModelError(
            f"unknown model {shape!r}; known models: {', '.join(MODEL_SHAPES)} "
            "(or give width/layers with one of them as the base)."
        )
    dims = dict(MODEL_SHAPES[shape])
    if width is not None:
        head_dim = dims["hidden_size"] // dims["num_attention_heads"]
        if width < 1 or width % min(head_dim, width) != 0:
            raise UnknownModelError(f"width={width} must be a positive multiple of the head size {head_dim}.")
        dims["num_attention_heads"] = max(1, width // head_dim)
        dims["hidden_size"] = width
        dims["intermediate_size"] = 4 * width
    if layers is not None:
        if layers < 1:
            raise UnknownModelError(f"layers={layers} must be >= 1.")
        dims["num_hidden_layers"] = layers
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_size=dims["hidden_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"],
        intermediate_size=dims["intermediate_size"],
    )


def build_model(
    shape: str,
    *,
    vocab_size: int = VOCAB,
    max_positions: int = 2048,
    seed: int = 0,
    width: int | None = None,
    layers: int | None = None,
) -> GPTNeoXForCausalLM:
    """A randomly initialised ``GPTNeoXForCausalLM`` of a named shape, identical for equal seeds.

    The global RNG is left as it was (initialisation runs in a forked RNG state).

    Raises:
        UnknownModelError: ``shape`` is not in :data:`MODEL_SHAPES` (the message lists them).
    """
    from transformers import GPTNeoXForCausalLM

    config = model_config(shape, vocab_size=vocab_size, max_positions=max_positions, width=width, layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPTNeoXForCausalLM(config)


def lm_loss(model: nn.Module, window: Tensor) -> Tensor:
    """Next-byte cross-entropy of ``window`` (``[batch, seq + 1]``): inputs ``[:, :-1]``.

    Takes models that return logits (:class:`PlainLM`) or an output with ``.logits`` (HF).
    """
    out = model(input_ids=window[:, :-1])
    logits = out if isinstance(out, Tensor) else out.logits  # [batch, seq, vocab]
    return F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())


class PlainBlock(nn.Module):
    """A pre-norm transformer-style block written with plain torch modules (MLP hidden ``hidden``)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        return x + cast(Tensor, self.mlp(self.norm(x)))


class PlainLM(nn.Module):
    """Embedding, a stack of PlainBlocks, a head: the smallest 'transformer MLP' model.

    Seeds the global RNG with ``seed`` (tests rely on the draws that follow being fixed too).
    ``hidden`` is the MLP width (default ``4 * width``).
    """

    def __init__(
        self, layers: int = 4, width: int = 16, vocab: int = VOCAB, seed: int = 0, hidden: int | None = None
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(PlainBlock(width, hidden or 4 * width) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return cast(Tensor, self.head(x))

    def loss(self, window: Tensor) -> Tensor:
        return lm_loss(self, window)


def _hf_model(config_class: str, model_class: str, seed: int, **config: Any) -> nn.Module:
    """``transformers.<model_class>(<config_class>(vocab_size=VOCAB, **config))``, seeded."""
    import transformers

    torch.manual_seed(seed)
    return cast(nn.Module, getattr(transformers, model_class)(getattr(transformers, config_class)(
        vocab_size=VOCAB, **config)))


def tiny_gpt_neox(layers: int = 4, hidden: int = 32, seed: int = 0) -> nn.Module:
    return _hf_model("GPTNeoXConfig", "GPTNeoXForCausalLM", seed, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=128)


def tiny_gpt2(layers: int = 4, seed: int = 0) -> nn.Module:
    return _hf_model("GPT2Config", "GPT2LMHeadModel", seed, n_embd=32, n_layer=layers, n_head=4, n_positions=128)


def tiny_llama(layers: int = 4, seed: int = 0) -> nn.Module:
    return _hf_model("LlamaConfig", "LlamaForCausalLM", seed, hidden_size=32, intermediate_size=88,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=128)


def tiny_bert(layers: int = 4, seed: int = 0) -> nn.Module:
    return _hf_model("BertConfig", "BertForMaskedLM", seed, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "gpt_neox": tiny_gpt_neox,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "bert": tiny_bert,
    "plain": PlainLM,
}
"""One tiny model per family that site discovery supports, by name."""


def stdlib_bytes(limit: int = 400_000) -> Tensor:
    """Real text that exists on every machine: the first ``limit`` bytes of the interpreter's own
    top-level standard-library sources (sorted by name), as int64 tokens ``[limit]``."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.tensor(list(b"".join(chunks)[:limit]), dtype=torch.long)
