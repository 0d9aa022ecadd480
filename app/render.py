"""Turning editcore results into what the page shows: thumbnails, captions, the plot, HTML panels."""
from __future__ import annotations

import base64
import html
import io

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from editcore import CLASSES, BrowseItem, EditEntry, EditReport

# Gallery thumbnails go out at 32 px as PNG; the page enlarges them with `image-rendering: pixelated`
# (CSS below), so every CIFAR pixel stays a crisp square. Sending 128 px WebPs instead cost the server
# ~3 ms per image, up to ~90 images per edit (docs/RELIABILITY.md).
THUMB_SCALE = 1
THUMB_FORMAT = "png"
LARGE_SCALE = 8
MAX_FLIPS_SHOWN = 32


def upscale(image: torch.Tensor, scale: int = THUMB_SCALE) -> np.ndarray:
    """uint8 (3,H,W) -> uint8 (H*scale, W*scale, 3)."""
    pixels = image.permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(pixels.repeat(scale, axis=0).repeat(scale, axis=1))


def class_name(label: int) -> str:
    return CLASSES[label] if label >= 0 else "unlabelled"


def browse_caption(item: BrowseItem) -> str:
    """'true → predicted' for a mistake, 'true ✓' for a right answer, '? → predicted' without a label."""
    if item.label < 0:
        return f"? → {CLASSES[item.predicted]}"
    if item.label == item.predicted:
        return f"{CLASSES[item.label]} ✓"
    return f"{CLASSES[item.label]} → {CLASSES[item.predicted]}"


def gallery(items: list[BrowseItem]) -> list[tuple[np.ndarray, str]]:
    return [(upscale(item.image), browse_caption(item)) for item in items]


def flip_gallery(images: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                 rows: list[int]) -> list[tuple[np.ndarray, str]]:
    """Held-out images whose prediction an edit changed, captioned 'before → after'."""
    shown = []
    for row in rows[:MAX_FLIPS_SHOWN]:
        shown.append((upscale(images[row]), f"{CLASSES[int(before[row])]} → {CLASSES[int(after[row])]}"))
    return shown


def selection_info(source_label: str, index: int, label: int, topk: list[tuple[str, float]]) -> str:
    predicted, confidence = topk[0]
    verdict = ""
    if label >= 0:
        verdict = "  \n✓ correct" if predicted == CLASSES[label] else "  \n✗ **misclassified**"
    return (f"**{source_label} #{index}**  \ntrue label: **{class_name(label)}**  \n"
            f"prediction: **{predicted}** ({confidence:.0%}){verdict}")


def accuracy_plot(curve: list[float], model: str, n_heldout: int) -> Figure:
    """Held-out accuracy after each edit of the session, the unedited model as a reference line."""
    figure = Figure(figsize=(6, 3.2), dpi=100, layout="constrained")
    axes = figure.subplots()
    steps = list(range(len(curve)))
    values = [100 * a for a in curve]
    axes.axhline(values[0], color="#888888", linestyle="--", linewidth=1, label=f"unedited model ({values[0]:.1f}%)")
    axes.plot(steps, values, marker="o", color="#2563eb", linewidth=2, label=f"{model} model after each edit")
    axes.set_xlabel("edits applied")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_title(f"Held-out accuracy ({n_heldout:,} images)", fontsize=11)
    # Every edit gets a tick up to 12; beyond that matplotlib picks whole-number ticks (None is not a tick list).
    if len(steps) <= 12:
        axes.set_xticks(steps)
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    low, high = min(values), max(values)
    pad = max(1.0, 0.25 * (high - low))
    axes.set_ylim(low - pad, high + pad)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    if len(values) > 1:
        axes.annotate(f"{values[-1] - values[0]:+.2f} points", (steps[-1], values[-1]), textcoords="offset points",
                      xytext=(-10, 8), ha="right", fontsize=9)
    return figure


def data_uri(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _chip(predicted: int, target: int) -> str:
    kind = "hit" if predicted == target else "miss"
    return f'<span class="chip {kind}">{html.escape(CLASSES[predicted])}</span>'


def views_html(report: EditReport, names: list[str]) -> str:
    """The edited image's augmented views with the unedited and the edited model's prediction on each."""
    target = report.targets[0]
    before = sum(p == target for p in report.views_before)
    after = sum(p == target for p in report.views_after)
    cells = []
    for image, name, b, a in zip(report.views, names, report.views_before, report.views_after):
        cells.append(f'<figure><img src="{data_uri(image)}" alt="{html.escape(name)}"><figcaption>'
                     f'<div class="view-name">{html.escape(name)}</div><div>before {_chip(b, target)}</div>'
                     f'<div>after {_chip(a, target)}</div></figcaption></figure>')
    return (f'<div class="views"><p><b>Does the fix carry over to small changes of the image?</b> '
            f'{len(names)} shifted, cropped, flipped, re-lit, JPEG-compressed and noisy copies; '
            f'<span class="chip hit">green</span> = predicted as the target <b>{html.escape(CLASSES[target])}</b>. '
            f'Before the edit {before}/{len(names)}, after it <b>{after}/{len(names)}</b>. '
            f'(A lookup table would fix only the exact image.)</p><div class="view-grid">{"".join(cells)}</div></div>')


def views_placeholder(text: str) -> str:
    return f'<div class="views"><p>{html.escape(text)}</p></div>'


def status_markdown(report: EditReport) -> str:
    d = report.to_dict()
    change = 100 * (d["heldout_accuracy_after"] - d["heldout_accuracy_before"])
    headline = f"**Applied:** {d['message']}" if report.applied else f"**Rolled back:** {d['message']}"
    effect = "" if report.applied else " (would have been)"
    return (f"{headline}  \n"
            f"{'Reached' if d['success'] else 'Did not reach'} *{', '.join(d['targets'])}* in {d['steps']} step(s), "
            f"{d['seconds']:.2f} s ({d['editor']}, lr {d['lr']:.3g}, {d['layers']}). "
            f"Held-out accuracy{effect} {100 * d['heldout_accuracy_before']:.2f}% → "
            f"{100 * d['heldout_accuracy_after']:.2f}% ({change:+.2f} points): **{d['n_fixed']} fixed**, "
            f"**{d['n_broken']} broken**, {d['n_changed']} of {d['n_heldout']:,} changed their prediction.")


HISTORY_HEADERS = ["#", "images", "target", "editor", "lr", "steps", "seconds", "accuracy before", "accuracy after",
                   "fixed", "broken"]


def history_rows(history: list[EditEntry]) -> list[list]:
    rows = []
    for entry in history:
        s = entry.summary()
        rows.append([s["edit"], ", ".join(s["images"]), ", ".join(s["targets"]), s["editor"], f"{s['lr']:.3g}", s["steps"],
                     f"{s['seconds']:.2f}", f"{100 * s['heldout_accuracy_before']:.2f}%",
                     f"{100 * s['heldout_accuracy_after']:.2f}%", s["n_fixed"], s["n_broken"]])
    return rows


CSS = """
#browse-gallery img, #fixed-gallery img, #broken-gallery img, #selected-image img, .views img { image-rendering: pixelated; }
.intro { font-size: 1.02em; }
.views p { margin: 0 0 6px 0; }
.view-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(78px, 1fr)); gap: 6px; }
.view-grid figure { margin: 0; text-align: center; font-size: 0.78em; line-height: 1.35; }
.view-grid img { display: inline-block; width: 56px; height: 56px; border-radius: 3px; }
.view-name { color: var(--body-text-color-subdued); }
.chip { display: inline-block; padding: 0 5px; border-radius: 8px; color: white; font-size: 0.95em; }
.chip.hit { background: #16a34a; }
.chip.miss { background: #dc2626; }
.notes { color: #b45309; }
#browse-gallery .caption-label, #fixed-gallery .caption-label, #broken-gallery .caption-label { font-size: 0.8em; }
table.compare { width: 100%; border-collapse: collapse; font-size: 0.9em; }
table.compare th, table.compare td { border: 1px solid var(--border-color-primary); padding: 4px 6px; vertical-align: top; }
table.compare .strip { display: flex; flex-wrap: wrap; gap: 3px; margin-top: 4px; max-width: 420px; }
table.compare img { display: inline-block; width: 38px; height: 38px; image-rendering: pixelated; box-sizing: content-box; }
"""


COMPARE_INTRO = (
    "The selected image corrected to the chosen label in several ways, each starting from the unedited model. "
    "A <b>lookup table</b> stores the corrected image and overrides the prediction for inputs that match it: it "
    "changes no weights, so held-out accuracy cannot drop, but a shifted or re-lit copy of the image no longer "
    "matches. <b>Fine-tuning</b> trains on the corrected image mixed with replayed training images (the training "
    "set with a data root, else a shipped sample of 2,000). The <b>editor</b> takes a few gradient steps on the "
    "edited layers; editable training prepares a model for exactly that. Compare the drop in held-out accuracy "
    "and the share of green views."
)


def _seconds(value: float) -> str:
    return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.1f} s"


def compare_html(views: torch.Tensor, names: list[str], outcomes, target: int) -> str:
    """One row per method: success, steps, time, held-out accuracy change, flips, augmented-view predictions."""
    uris = [data_uri(view) for view in views]
    rows = []
    for o in outcomes:
        hits = sum(p == target for p in o.views_after)
        hits_before = sum(p == target for p in o.views_before)
        strip = "".join(
            f'<img src="{uri}" title="{html.escape(name)}: {html.escape(CLASSES[p])}" '
            f'style="border: 3px solid {"#16a34a" if p == target else "#dc2626"}">'
            for uri, name, p in zip(uris, names, o.views_after))
        change = 100 * (o.accuracy_after - o.accuracy_before)
        rows.append(
            f"<tr><td><b>{html.escape(o.title)}</b><br><small>{html.escape(o.detail)}</small></td>"
            f"<td>{'✓ yes' if o.success else '✗ no'}</td><td>{o.steps}</td><td>{_seconds(o.seconds)}</td>"
            f"<td>{100 * o.accuracy_before:.2f}% → {100 * o.accuracy_after:.2f}%<br><b>{change:+.2f} points</b></td>"
            f"<td>{o.n_fixed} / {o.n_broken}</td>"
            f"<td><b>{hits}/{len(names)}</b> at the target (before: {hits_before})<div class='strip'>{strip}</div></td></tr>")
    return (f"<p>{COMPARE_INTRO}</p><table class='compare'><tr><th>Method</th><th>Image fixed?</th><th>Steps</th>"
            f"<th>Time</th><th>Held-out accuracy</th><th>Fixed / broken</th>"
            f"<th>Augmented views predicted as <b>{html.escape(CLASSES[target])}</b> (green) after the fix</th></tr>"
            f"{''.join(rows)}</table>")
