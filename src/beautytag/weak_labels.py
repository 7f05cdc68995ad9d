"""Weak labels read from product text (titles, shade descriptions).

Catalogues rarely label finish or benefits, but product names often say them
("Lakme Absolute *Matte* Lipstick", "Sunscreen *SPF 40*"). These rules turn such
words into labels. They are deliberately simple, committed and tested; their
measured quality is reported in the model card. A rule returns ``None`` when the
text says nothing (the label stays missing), never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Finish: first matching rule wins, most specific first.
FINISH_RULES: list[tuple[str, str]] = [
    ("shimmer", r"shimmer|glitter|sparkl|pearl|metallic|luminous|luminosity|frost|glow|foil"),
    ("matte", r"matte|mattifying|velvet|powder|blur"),
    ("gloss", r"gloss|shine|lacquer|lustrous|vinyl|wet|polish|lip oil|plumping"),
    ("satin", r"satin|silk"),
    ("sheer", r"sheer|tint|stain|balm"),
    ("cream", r"cr[eè]me|cream|butter|souffle|mousse"),
]
FINISH_CLASSES = [name for name, _ in FINISH_RULES]

# Function tags: every matching tag is set; text with none of them is labelled "no tag".
FUNCTION_RULES: dict[str, str] = {
    "sun_protection": r"\bspf\b|spf ?\d|sun ?scr|sunscream|\bsun\b|\buv\b",
    "waterproof": r"water ?proof|water resistant|smudge ?proof",
    "long_lasting": r"long ?wear|long ?stay|long ?lasting|everlasting|stay ?on|colou?r ?stay"
    r"|true ?wear|extra durable|\b\d{1,2} ?h(ou)?rs?\b|all day|nine to five|lasting",
    "moisturising": r"moistur|hydrat|nourish|\bbalm\b|butter",
    "anti_ageing": r"anti[- ]?age?ing|age defying|age protect|regenerist|wrinkle|firming",
    "brightening": r"whitening|brighten|fairness|radiance|white ?glow",
}
FUNCTION_CLASSES = list(FUNCTION_RULES)


def _normalise(text: str) -> str:
    return " " + re.sub(r"\s+", " ", text.lower().replace("-", " ")) + " "


def finish_from_text(text: str) -> str | None:
    """The finish a product text names, or None when it names none."""
    t = _normalise(text)
    for name, pattern in FINISH_RULES:
        if re.search(pattern, t):
            return name
    return None


def function_from_text(text: str) -> list[str] | None:
    """The benefit tags a product text names ([] when it names none; None for empty text)."""
    if not text.strip():
        return None
    t = _normalise(text)
    return [tag for tag, pattern in FUNCTION_RULES.items() if re.search(pattern, t)]


RULES: dict[str, Callable[[str], str | list[str] | None]] = {
    "finish": finish_from_text,
    "function": function_from_text,
}
