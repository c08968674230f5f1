"""The toy world's words: a fixed word-level tokenizer and the prompt templates."""

from __future__ import annotations

import re

import torch

from ziplora.toy.world import ALL_STYLE_NAMES, ALL_SUBJECTS

__all__ = ["VOCAB", "RARE_TOKENS", "Tokenizer", "subject_prompt", "style_prompt", "pair_prompt"]

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
WORDS = ("a", "an", "the", "in", "of", "style", "shape", "thing", "photo", "drawing", "and", "with")
# Identifiers for DreamBooth LoRAs: never used while training the base model.
RARE_TOKENS = ("sks", "ohwx", "pqz", "zwx", "vty", "kqr", "jfx", "qmu")
VOCAB: tuple[str, ...] = SPECIALS + WORDS + ALL_SUBJECTS + ALL_STYLE_NAMES + RARE_TOKENS

_LORA_TAG = re.compile(r"<[^>]*>")
_WORD = re.compile(r"[a-z0-9]+")


class Tokenizer:
    """Lower-cases, drops ``<lora:...>``-like tags and punctuation, maps words to ids, pads to a length."""

    def __init__(self, max_length: int = 16) -> None:
        self.max_length = max_length
        self.ids = {w: i for i, w in enumerate(VOCAB)}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] and the index of each prompt's end token [B]."""
        rows, eos = [], []
        for prompt in prompts:
            words = _WORD.findall(_LORA_TAG.sub(" ", prompt.lower()))
            ids = [self.ids["<bos>"]] + [self.ids.get(w, self.ids["<unk>"]) for w in words]
            ids = ids[: self.max_length - 1] + [self.ids["<eos>"]]
            eos.append(len(ids) - 1)
            rows.append(ids + [self.ids["<pad>"]] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long), torch.tensor(eos, dtype=torch.long)

    def known(self, word: str) -> bool:
        return word.lower() in self.ids


def subject_prompt(subject: str) -> str:
    return f"a {subject}"


def style_prompt(style: str, thing: str = "shape") -> str:
    return f"a {thing} in {style} style"


def pair_prompt(subject: str, style: str) -> str:
    return f"a {subject} in {style} style"
