"""A catalogue at a glance: one self-contained HTML page from prediction records.

The page holds the counts of each class attribute (category, colour family, finish) and of
each tag, a palette of the predicted shades, a histogram of the scores of each class
attribute, the least confident photos as thumbnails, and the not-a-cosmetic (a null category)
and error counts. Every image is a data URI and nothing is fetched from elsewhere, so the page
can be mailed or archived. Matplotlib (Agg, without pyplot) and PIL are imported only when a
page is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from beautytag.catalogue.records import attribute_kind

MAX_SWATCHES = 120
SWATCH_STEP = 5.0  # shades closer than this in each Lab coordinate share a swatch
HEX = re.compile(r"#[0-9a-fA-F]{6}")
STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:2px 8px;text-align:left}
td.n{text-align:right}.bar{background:#8a6;height:.8em;display:inline-block}
.sw{width:22px;height:22px;display:inline-block;margin:1px;border:1px solid #ccc}
figure{display:inline-block;margin:4px;width:120px;font-size:11px;vertical-align:top}
figure img{display:block;max-width:112px;max-height:112px}.h img{margin:4px}
"""


def write_report(
    records: Iterable[dict],
    out_html: str | Path,
    attribute: str = "category",
    thumbnails: int = 24,
    thumb_px: int = 112,
) -> None:
    """Write the page for `records` to `out_html`. `attribute` is the one whose null label
    means not a cosmetic and whose least confident photos are shown (`thumbnails` of them, at
    most `thumb_px` pixels a side; a photo that cannot be read is skipped)."""
    records = list(records)
    answered = [r for r in records if r.get("attributes")]
    errors = Counter(str(r.get("error") or "no answer") for r in records if not r.get("attributes"))
    kinds = attribute_kinds(answered)
    not_cosmetic = sum(1 for r in answered if answer(r, attribute).get("label", "") is None)
    models = Counter(str(r.get("model") or "unnamed") for r in records)
    parts = [
        "<h1>Catalogue report</h1>",
        f"<p>{len(records)} photos: {len(answered)} tagged, {not_cosmetic} not a cosmetic "
        f"(no {esc(attribute)}), {plural(sum(errors.values()), 'error')}. Models: "
        + ", ".join(f"{esc(m)} ({n})" for m, n in models.most_common())
        + ".</p>",
    ]
    for name, kind in kinds.items():
        if kind == "single":
            labels = Counter(answer(r, name).get("label") for r in answered if answer(r, name))
            labels.pop(None, None)
            parts += [f"<h2>{esc(name)}</h2>", counts_table(labels)]
        elif kind == "multi":
            tags = Counter(t for r in answered for t, _ in answer(r, name).get("labels") or [])
            parts += [f"<h2>{esc(name)} tags</h2>", counts_table(tags)]
        else:
            parts += [f"<h2>{esc(name)} palette</h2>", palette(answered, name)]
    singles = [name for name, kind in kinds.items() if kind == "single"]
    if singles:
        parts.append("<h2>Scores</h2><div class=h>")
        for name in singles:
            scores = [answer(r, name).get("score") for r in answered]
            parts.append(img(histogram_png([s for s in scores if s is not None], name), name))
        parts.append("</div>")
    if attribute in singles and thumbnails > 0:
        parts.append(f"<h2>Least confident {esc(attribute)}</h2>")
        parts.append(least_confident(answered, attribute, thumbnails, thumb_px))
    parts += ["<h2>Errors</h2>", counts_table(errors) if errors else "<p>None.</p>"]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>beautytag catalogue report</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    try:
        Path(out_html).write_text(page, encoding="utf-8", errors="replace")
    except OSError as e:
        raise ValueError(f"{out_html}: cannot write ({e.strerror})") from None


def plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def esc(text: object) -> str:
    return html.escape(str(text))


def answer(record: dict, name: str) -> dict:
    """A record's answer for one attribute ({} if it has none)."""
    return (record.get("attributes") or {}).get(name) or {}


def attribute_kinds(records: Iterable[dict]) -> dict[str, str]:
    """Each attribute's kind (single, multi, shade), in the order the records name them."""
    kinds: dict[str, str] = {}
    for r in records:
        for name, v in r["attributes"].items():
            kinds.setdefault(name, attribute_kind(v))
    return kinds


def counts_table(counts: Counter) -> str:
    """A table of counts, the commonest first, each with a bar."""
    total = sum(counts.values()) or 1
    rows = [
        f"<tr><td>{esc(k)}</td><td class=n>{n}</td><td class=n>{100 * n / total:.1f} %</td>"
        f'<td><span class=bar style="width:{200 * n / total:.0f}px"></span></td></tr>'
        for k, n in counts.most_common()
    ]
    return "<table>" + "".join(rows) + "</table>"


def palette(records: list[dict], name: str) -> str:
    """The predicted shades as swatches: near shades share one, the commonest
    :data:`MAX_SWATCHES` are shown, lightest first."""
    bins: dict[tuple, list] = {}
    for r in records:
        v = answer(r, name)
        if HEX.fullmatch(str(v.get("hex", ""))) and len(v.get("lab") or []) == 3:
            key = tuple(round(t / SWATCH_STEP) for t in v["lab"])
            bins.setdefault(key, [v["hex"], v["lab"][0], 0])[2] += 1
    shown = sorted(bins.values(), key=lambda b: -b[2])[:MAX_SWATCHES]
    swatches = [
        f'<span class=sw style="background:{h}" title="{h}: {plural(n, "photo")}"></span>'
        for h, _, n in sorted(shown, key=lambda b: -b[1])
    ]
    more = f" ({len(bins) - len(shown)} rarer shades not shown)" if len(bins) > len(shown) else ""
    return f"<p>{len(bins)} shades{more}</p><div>{''.join(swatches)}</div>"


def histogram_png(scores: list[float], name: str) -> bytes:
    """A histogram of scores (0 to 1) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(scores, bins=20, range=(0, 1), color="#8a6")
    ax.set(title=f"{name} ({len(scores)} answers)", xlabel="score", ylabel="photos")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def img(png_or_jpeg: bytes, alt: str, mime: str = "image/png") -> str:
    data = base64.b64encode(png_or_jpeg).decode()
    return f'<img src="data:{mime};base64,{data}" alt="{esc(alt)}">'


def thumbnail(path: str, px: int) -> bytes | None:
    """A JPEG thumbnail at most `px` a side, or None if the photo cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (px, px))  # a JPEG decodes at a fraction of its size
            small = im.convert("RGB")
            small.thumbnail((px, px))
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=80)
            return buf.getvalue()
    except Exception:  # missing, not an image, truncated, too big...: no thumbnail
        return None


def least_confident(records: list[dict], name: str, n: int, px: int) -> str:
    """Thumbnails of the `n` readable photos whose `name` scores lowest."""
    scored = [r for r in records if answer(r, name).get("score") is not None]
    scored.sort(key=lambda r: answer(r, name)["score"])
    figures = []
    for r in scored[: 4 * n]:  # bounded: a catalogue whose photos moved stays quick
        jpeg = thumbnail(r["file"], px)
        if jpeg is None:
            continue
        a = answer(r, name)
        label = a.get("label") or "not a cosmetic"  # a null label: the gate rejected it
        figures.append(
            f"<figure>{img(jpeg, r['file'], 'image/jpeg')}<figcaption>{esc(label)} "
            f"{a['score']:.2f}<br>{esc(Path(r['file']).name)}</figcaption></figure>"
        )
        if len(figures) == n:
            break
    return "<div>" + "".join(figures) + "</div>" if figures else "<p>No photo to show.</p>"
