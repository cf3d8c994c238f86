"""Loading a local causal LM for analysis, strictly: a checkpoint of another model is an error.

``from_pretrained`` on its own initialises missing weights at random with only a log line; for
an analysis that would silently measure noise, so every key and shape is checked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

BYTE_VOCAB = 256


class InputError(Exception):
    """Bad user input: the message says what is wrong and how to fix it."""


def load_causal_lm(target: Path) -> nn.Module:
    """A causal LM from a local folder (``config.json`` + weights) or a ``.safetensors`` file.

    A file is read with the ``config.json`` of its folder (e.g. a demo run's
    ``model.safetensors``). Without a tokenizer in the folder the model must take byte tokens
    (vocabulary >= 256).

    Raises:
        InputError: the path is missing, holds no config, the weights do not belong to the
            config's model, or the vocabulary cannot hold byte tokens.
    """
    from transformers import AutoConfig

    if not target.exists():
        raise InputError(f"{str(target)!r} does not exist; pass a model folder (config.json + weights) "
                         "or a .safetensors checkpoint beside a config.json.")
    folder = target if target.is_dir() else target.parent
    if not (folder / "config.json").is_file():
        raise InputError(f"{str(folder)!r} has no config.json; pass a folder written by save_pretrained "
                         "or a demo run folder.")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises many types for a bad config
        raise InputError(f"{str(folder / 'config.json')!r} is not a usable model config: {_first_line(error)}") from error
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < BYTE_VOCAB and load_tokenizer(target) is None:
        raise InputError(f"the model's vocabulary ({vocab}) cannot hold byte tokens (256) and {str(folder)!r} "
                         "has no tokenizer; save the tokenizer next to the model (save_pretrained).")
    model = _from_folder(folder) if target.is_dir() else _from_file(target, config)
    model.eval()
    return model


def _from_folder(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # its load report would duplicate (and bury) ours below
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
    except Exception as error:  # shape mismatches, missing weight files, unknown architectures
        raise InputError(f"cannot load the model in {str(folder)!r}: {_first_line(error)}") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    model, info = loaded
    problems = [f"missing {k}" for k in info.get("missing_keys", [])]
    problems += [f"unexpected {k}" for k in info.get("unexpected_keys", [])]
    problems += [f"shape of {item[0] if isinstance(item, tuple) else item}" for item in info.get("mismatched_keys", [])]
    _raise_if_foreign(folder, problems)
    result: nn.Module = model
    return result


def _from_file(path: Path, config: Any) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if path.suffix != ".safetensors":
        raise InputError(f"{str(path)!r} is not a .safetensors file; pass a model folder or a .safetensors file.")
    try:
        state = _model_weights(path, load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{str(path)!r} is not a readable safetensors file: {_first_line(error)}") from error
    auto: Any = AutoModelForCausalLM  # from_config is untyped in transformers
    model: nn.Module = auto.from_config(config)
    _raise_if_foreign(path, compare_state(model.state_dict(), state))
    model.load_state_dict(state, strict=False)  # strictness checked above (tied weights may be absent)
    return model


def _model_weights(path: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's weights in ``tensors``: a ``save_checkpoint`` file (the demo's
    ``checkpoint.safetensors``) keeps them under ``model.`` beside the optimizer's state."""
    from safetensors import safe_open

    from .._src.checkpoint import FORMAT

    with safe_open(str(path), framework="pt") as file:
        if (file.metadata() or {}).get("format") != FORMAT:
            return tensors
    weights = {key[len("model."):]: value for key, value in tensors.items() if key.startswith("model.")}
    if not weights:
        raise InputError(f"{str(path)!r} is an l2e_optim checkpoint saved without its model; pass the "
                         "run's model.safetensors or its folder.")
    return weights


def compare_state(expected: dict[str, Tensor], found: dict[str, Tensor]) -> list[str]:
    """Differences between a model's state dict and a file's tensors (missing, extra, shapes)."""
    tied = {k for k in expected if k.endswith(("lm_head.weight", "embed_out.weight"))}
    problems = [f"missing {k}" for k in expected if k not in found and k not in tied]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [
        f"shape of {k}: file {tuple(found[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    return problems


def _raise_if_foreign(where: Path, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise InputError(f"{str(where)!r} holds the weights of another model than its config.json describes "
                         f"({shown}); pass the config.json that was saved with these weights.")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(target: Path) -> Any | None:
    """The folder's Hugging Face tokenizer, or None when it has none (byte tokens are used then)."""
    folder = target if target.is_dir() else target.parent
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # a broken tokenizer folder: say so rather than guess byte tokens
        raise InputError(f"the tokenizer in {str(folder)!r} does not load: {_first_line(error)}") from error


def tokenize_bytes(
    tokenizer: Any, data: Tensor, labels: Tensor | None, max_bytes: int
) -> tuple[Tensor, Tensor | None]:
    """Token ids of the text in ``data`` (bytes), each with the label of its last byte.

    The last byte, not the first: sub-word tokens often start with the space before a word.
    Labels need a fast tokenizer (offsets); with a slow one they are None.
    """
    import torch

    text = bytes(data[:max_bytes].tolist()).decode("utf-8", errors="ignore")  # sync-ok: report text
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.int64)
    if labels is None or not fast:
        return ids, None
    byte_end = torch.tensor([len(c.encode("utf-8")) for c in text], dtype=torch.int64).cumsum(0)
    last = [byte_end[end - 1] - 1 if end > start else 0 for start, end in encoded["offset_mapping"]]
    index = torch.tensor(last, dtype=torch.int64).clamp(0, max(0, labels.numel() - 1))
    return ids, labels[index]


def token_renderer(tokenizer: Any, before: int = 8, after: int = 3) -> Any:
    """``render(ids, position)`` for the analysis: decoded context with the token in brackets."""

    def render(ids: Tensor, position: int) -> str:
        def text(lo: int, hi: int) -> str:
            piece: str = tokenizer.decode(ids[max(0, lo) : max(0, hi)].tolist())  # sync-ok: report text
            return piece.replace("\n", "\\n").replace("\t", "\\t")

        return f"{text(position - before, position)}[{text(position, position + 1)}]{text(position + 1, position + 1 + after)}"

    return render
