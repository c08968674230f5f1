"""The bundled LoRAs: which novel subject or style each one learned, behind which rare-token identifier."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ToyLora", "SUBJECT_LORAS", "STYLE_LORAS", "ALL_LORAS", "by_name"]


@dataclass(frozen=True)
class ToyLora:
    name: str  # file stem
    kind: str  # "subject" | "style"
    concept: str  # the novel subject or style it depicts (what the scorers must find)
    identifier: str  # the rare token
    base_styles: tuple[str, ...] = ()  # subject LoRAs: the renderings of their 5 training images
    base_subject: str = ""  # style LoRAs: the shape drawn in their single training image

    @property
    def trigger(self) -> str:
        return f"{self.identifier} shape" if self.kind == "subject" else f"{self.identifier} style"

    @property
    def prompt(self) -> str:
        """What it draws alone (the data-free ZipLoRA inputs use the same form)."""
        return f"a {self.identifier} shape" if self.kind == "subject" else f"a shape in {self.identifier} style"


SUBJECT_LORAS = (
    ToyLora("heart_sks", "subject", "heart", "sks", base_styles=("crimson", "ocean", "forest", "candy", "ember")),
    ToyLora("crescent_ohwx", "subject", "crescent", "ohwx", base_styles=("night", "crimson", "candy", "ocean", "forest")),
    ToyLora("tee_pqz", "subject", "tee", "pqz", base_styles=("ember", "forest", "night", "crimson", "ocean")),
)
STYLE_LORAS = (
    ToyLora("zebra_zwx", "style", "zebra", "zwx", base_subject="circle"),
    ToyLora("neon_vty", "style", "neon", "vty", base_subject="square"),
    ToyLora("cocoa_kqr", "style", "cocoa", "kqr", base_subject="diamond"),
)
ALL_LORAS = SUBJECT_LORAS + STYLE_LORAS


def by_name(name: str) -> ToyLora:
    for lora in ALL_LORAS:
        if lora.name == name:
            return lora
    raise KeyError(name)


def both_prompt(subject: ToyLora, style: ToyLora) -> str:
    return f"a {subject.identifier} shape in {style.identifier} style"
