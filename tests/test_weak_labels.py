import pytest

from beautytag.weak_labels import finish_from_text, function_from_text


@pytest.mark.parametrize(
    "text, finish",
    [
        ("Lakme Absolute Matte Grape Blossom Lipstick 209", "matte"),
        ("Revlon Super Lustrous Lip Gloss 53", "gloss"),
        ("Colorbar Fire Nail Lacquer 07", "gloss"),
        ("Lakme Absolute Fast & Fabulous Gold Shimmer Nail Polish 01", "shimmer"),
        ("light peach w/ golden shimmer", "shimmer"),
        ("Streetwear Satin Smooth Miss Maroon Lipstick 10", "satin"),
        ("Lakme Nine to Five Flawless Creme Marble Compact", "cream"),
        ("Lakme Cheek Chromatic Day Sheer Blusher", "sheer"),
        ("sheer matte peach", "matte"),  # most specific rule first
        ("Nike Fragrances Women Paradise Perfume", None),
        ("", None),
    ],
)
def test_finish_rule(text, finish):
    assert finish_from_text(text) == finish


@pytest.mark.parametrize(
    "text, tags",
    [
        ("Lotus Herbals Safe Sun Sunscreen SPF 40", ["sun_protection"]),
        ("Colorbar Precision Waterproof Eye Liner", ["waterproof"]),
        ("Streetwear Stay On Longwear Amethyst Lip Liner 02", ["long_lasting"]),
        (
            "Revlon Touch & Glow Advanced Fairness Daily Moisturising Cream SPF15",
            ["sun_protection", "moisturising", "brightening"],
        ),
        ("Olay Women Age Protect Anti-Ageing UV Lotion", ["sun_protection", "anti_ageing"]),
        ("Rasasi Women Emotion Perfume", []),  # labelled: no benefit named
    ],
)
def test_function_rule(text, tags):
    assert function_from_text(text) == tags


def test_function_rule_leaves_empty_text_unlabelled():
    assert function_from_text("   ") is None
