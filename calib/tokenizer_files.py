"""Calibration stage: find and load a model's tokenizer (a ``tokenizer.json`` or a Hugging Face folder).

Where a tokenizer is looked for, in order (the first hit wins; nothing is guessed beyond these):

1. the path the user gave (``--tokenizer``): a ``tokenizer.json`` file, or a folder holding one, or a Hugging
   Face tokenizer folder (``tokenizer_config.json`` with ``vocab.txt``, ``vocab.json`` + ``merges.txt`` or a
   SentencePiece ``tokenizer.model``; converted with ``transformers`` when there is no ``tokenizer.json``);
2. the folder of the model file, then its parent when that folder is named ``onnx`` (the layout of Hugging
   Face repositories that ship ``onnx/model.onnx`` beside the tokenizer at the top);
3. the same places around any further model files the caller names (the FP32 reference of an evaluation);
4. a tokenizer the caller knows belongs to this exact model (the bundled MiniLM, identified by the builder).

Nothing found raises :class:`ConfigError` naming every place looked at and the ``--tokenizer`` flag; a
model never silently gets another model's tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calib.errors import BackendUnavailable, ConfigError

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
# files that make a folder a Hugging Face tokenizer folder without a tokenizer.json
HF_VOCAB_FILES = ("vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
HF_CONFIG = "tokenizer_config.json"
TOKENIZER_FLAG = "--tokenizer"


@dataclass(frozen=True, kw_only=True)
class TokenizerFile:
    """Where a tokenizer was found and how (``kind``: "tokenizer.json", "hf-folder" or "known")."""

    path: Path
    kind: str
    reason: str  # how it was found, for logs and reports ("next to the model", "given with --tokenizer")


def _is_hf_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_VOCAB_FILES)


def tokenizer_in(folder: Path) -> TokenizerFile | None:
    """The tokenizer held by ``folder`` (its ``tokenizer.json``, else its Hugging Face files), if any."""
    if (folder / TOKENIZER_JSON).is_file():
        return TokenizerFile(path=folder / TOKENIZER_JSON, kind="tokenizer.json", reason=f"found in {folder}")
    if _is_hf_folder(folder):
        return TokenizerFile(path=folder, kind="hf-folder", reason=f"Hugging Face tokenizer files in {folder}")
    return None


def search_folders(model_path: Path) -> list[Path]:
    """The folders searched for ``model_path``'s tokenizer (its folder; its parent when that is ``onnx/``)."""
    folder = model_path.resolve().parent
    folders = [folder]
    if folder.name == "onnx":
        folders.append(folder.parent)
    return folders


def explicit_tokenizer(path: Path) -> TokenizerFile:
    """The tokenizer the user named: a JSON file, or a folder with a tokenizer.json or Hugging Face files."""
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ConfigError(
                f"{TOKENIZER_FLAG} {path}: expected a tokenizer.json file or a Hugging Face tokenizer folder"
            )
        return TokenizerFile(path=path, kind="tokenizer.json", reason=f"given with {TOKENIZER_FLAG}")
    if path.is_dir():
        found = tokenizer_in(path)
        if found is None:
            raise ConfigError(
                f"{TOKENIZER_FLAG} {path}: the folder has no {TOKENIZER_JSON} and none of {', '.join(HF_VOCAB_FILES)}"
            )
        return TokenizerFile(path=found.path, kind=found.kind, reason=f"given with {TOKENIZER_FLAG}")
    raise ConfigError(f"{TOKENIZER_FLAG} {path} does not exist")


def find_tokenizer(
    model_paths: Sequence[Path], explicit: Path | None = None, known: Path | None = None
) -> TokenizerFile:
    """The tokenizer for the models in ``model_paths`` (see the module docstring for the search order).

    ``known`` is a tokenizer the caller has identified as belonging to this exact model (last resort).
    """
    if explicit is not None:
        return explicit_tokenizer(Path(explicit))
    looked: list[str] = []
    for model_path in model_paths:
        for folder in search_folders(Path(model_path)):
            found = tokenizer_in(folder)
            if found is not None:
                return TokenizerFile(path=found.path, kind=found.kind, reason=f"next to the model ({found.reason})")
            looked.append(f"{folder}/{{{TOKENIZER_JSON},{','.join(HF_VOCAB_FILES)}}}")
    if known is not None:
        return TokenizerFile(path=known, kind="known", reason="the bundled model's own tokenizer")
    where = "; ".join(dict.fromkeys(looked)) or "nowhere (the model was given in memory, without a path)"
    raise ConfigError(
        f"no tokenizer found for the model; looked in: {where}. Pass {TOKENIZER_FLAG} PATH (a tokenizer.json "
        "or a Hugging Face tokenizer folder), or put the tokenizer next to the model"
    )


def load_tokenizer_file(found: TokenizerFile) -> Any:
    """A ``tokenizers.Tokenizer`` for ``found`` (Hugging Face folders without JSON go through transformers)."""
    from tokenizers import Tokenizer

    if found.path.is_file():
        try:
            return Tokenizer.from_file(str(found.path))
        except Exception as exc:  # the tokenizers library raises a plain Exception for unreadable files
            raise ConfigError(f"cannot read tokenizer {found.path}: {exc}") from exc
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailable(
            f"{found.path} has Hugging Face tokenizer files but no {TOKENIZER_JSON}; converting them needs "
            "transformers (`pip install 'build-engine[export]'`), or pass a tokenizer.json"
        ) from exc
    try:
        hf = AutoTokenizer.from_pretrained(str(found.path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the Hugging Face tokenizer in {found.path}: {exc}") from exc
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"the tokenizer in {found.path} has no fast (tokenizers) form; save it as tokenizer.json")
    logger.info("converted the Hugging Face tokenizer in %s", found.path)
    return backend
