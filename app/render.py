"""Turning editcore results into what the page shows: thumbnails, captions, the plot, HTML panels."""
from __future__ import annotations

import atexit
import base64
import hashlib
import html
import io
import math
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from editcore import BrowseItem, EditOutcome, EditReport, HeldOutScore

# Gallery thumbnails go out at 32 px as PNG; the page enlarges them with `image-rendering: pixelated`
# (CSS below), so every CIFAR pixel stays a crisp square. Sending 128 px WebPs instead cost the server
# ~3 ms per image, up to ~90 images per edit (docs/RELIABILITY.md).
THUMB_SCALE = 1
THUMB_MAX = 96  # larger images (a 224 px model's) go out shrunk to this side in galleries
LARGE_SIDE = 256  # the selected image is enlarged by a whole factor up to this side
MAX_IMAGE_FILES = 50_000  # ~2 KB each; content-addressed, so only distinct images count
MAX_FLIPS_SHOWN = 32
PLOT_WIDTH, PLOT_HEIGHT = 600, 320
PLOT_BOX = (56, 16, 32, 44)  # left, right, top, bottom margins around the axes
MAX_MARKERS = 60  # a dot per edit up to this many edits; beyond, the line alone


def upscale(image: torch.Tensor, scale: int = THUMB_SCALE) -> np.ndarray:
    """uint8 (3,H,W) -> uint8 (H*scale, W*scale, 3)."""
    pixels = image.permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(pixels.repeat(scale, axis=0).repeat(scale, axis=1))


class ImageFiles:
    """Each distinct image written once as a PNG file, named by its content, in one folder per process.

    Handed numpy arrays, Gradio encodes, hashes and writes every gallery image on every call: ~1/3 of
    the server's CPU per edit cycle (a page of 24 thumbnails plus the flip sets, after each edit and
    undo). A file in a folder registered as static costs it a path check. The oldest files beyond
    `most` are deleted (a page still showing one then shows a broken thumbnail until it refreshes)."""

    def __init__(self, most: int = MAX_IMAGE_FILES):
        self.most = most
        self._folder: Path | None = None
        self._paths: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="editlab-images-"))
                atexit.register(shutil.rmtree, self._folder, True)
            return self._folder

    def path(self, image: torch.Tensor, scale: int = THUMB_SCALE) -> str:
        """The PNG file of a uint8 (3,H,W) image enlarged `scale` times (nearest neighbour)."""
        pixels = image.detach().cpu().contiguous()
        key = hashlib.blake2b(pixels.numpy().tobytes() + repr((tuple(pixels.shape), scale)).encode(),
                              digest_size=16).hexdigest()
        with self._lock:
            if key in self._paths:
                self._paths.move_to_end(key)
                return self._paths[key]
        path = self.folder / f"{key}.png"
        partial = path.with_suffix(f".{threading.get_ident()}.part")
        Image.fromarray(upscale(pixels, scale)).save(partial, format="PNG")
        partial.replace(path)  # a reader never sees half a file
        with self._lock:
            self._paths[key] = str(path)
            while len(self._paths) > self.most:
                Path(self._paths.popitem(last=False)[1]).unlink(missing_ok=True)
        return str(path)


IMAGE_FILES = ImageFiles()


def class_name(label: int, classes: tuple[str, ...]) -> str:
    return classes[label] if label >= 0 else "unlabelled"


def browse_caption(item: BrowseItem, classes: tuple[str, ...]) -> str:
    """'true → predicted' for a mistake, 'true ✓' for a right answer, '? → predicted' without a label."""
    if item.label < 0:
        return f"? → {classes[item.predicted]}"
    if item.label == item.predicted:
        return f"{classes[item.label]} ✓"
    return f"{classes[item.label]} → {classes[item.predicted]}"


def thumbnail(image: torch.Tensor) -> torch.Tensor:
    """The image as a gallery shows it: as it is up to THUMB_MAX pixels, else shrunk (area average) to that."""
    side = max(image.shape[-2:])
    if side <= THUMB_MAX:
        return image
    size = [max(1, round(s * THUMB_MAX / side)) for s in image.shape[-2:]]
    shrunk = torch.nn.functional.interpolate(image[None].float(), size=size, mode="area")[0]
    return shrunk.round().clamp(0, 255).to(torch.uint8)


def gallery(items: list[BrowseItem], classes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(PNG file, caption) per browse item."""
    return [(IMAGE_FILES.path(thumbnail(item.image)), browse_caption(item, classes)) for item in items]


def large_image(image: torch.Tensor, original: str | None = None) -> str:
    """The selected image's PNG file (what the model sees), enlarged by a whole factor for the page; with the
    `original` picture file, that picture (scaled to the same height) on its left."""
    enlarged = torch.from_numpy(upscale(image, max(1, LARGE_SIDE // max(image.shape[-2:])))).permute(2, 0, 1)
    if original is None:
        return IMAGE_FILES.path(enlarged)
    try:
        with Image.open(original) as picture:
            picture = picture.convert("RGB")
            height = enlarged.shape[1]
            picture = picture.resize((max(1, round(picture.width * height / picture.height)), height),
                                     Image.Resampling.LANCZOS)
            left = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    except OSError:  # the file changed on disk since the folder was read: show what the model sees
        return IMAGE_FILES.path(enlarged)
    gap = torch.full((3, height, 8), 255, dtype=torch.uint8)
    return IMAGE_FILES.path(torch.cat([left, gap, enlarged], dim=2))


def flip_gallery(images: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                 rows: list[int], classes: tuple[str, ...]) -> list[tuple[str, str]]:
    """Held-out images whose prediction an edit changed, captioned 'before → after'."""
    return [(IMAGE_FILES.path(thumbnail(images[row])), f"{classes[int(before[row])]} → {classes[int(after[row])]}")
            for row in rows[:MAX_FLIPS_SHOWN]]


def selection_info(source_label: str, index: int, label: int, topk: list[tuple[str, float]],
                   classes: tuple[str, ...]) -> str:
    predicted, confidence = topk[0]
    verdict = ""
    if label >= 0:
        verdict = "  \n✓ correct" if predicted == classes[label] else "  \n✗ **misclassified**"
    return (f"**{source_label} #{index}**  \ntrue label: **{class_name(label, classes)}**  \n"
            f"prediction: **{predicted}** ({confidence:.0%}){verdict}")


def value_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(s * power for s in (1, 2, 2.5, 5, 10) if s * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [k * step for k in range(first, math.floor(high / step + 1e-9) + 1)]


def edit_ticks(n_edits: int, most: int = 12) -> list[int]:
    """Whole-number ticks 0..n_edits: every edit up to `most`, then steps of 2, 5, 10, 20, 50... (at most
    `most` + 1 ticks)."""
    k = step = 1
    while n_edits / step > most:
        step = (1, 2, 5)[k % 3] * 10 ** (k // 3)
        k += 1
    return list(range(0, n_edits + 1, step))


def accuracy_plot(curve: list[float], model: str, n_heldout: int) -> str:
    """Held-out accuracy after each edit of the session as an inline SVG, the unedited model as a dashed
    reference line. Drawn as text: matplotlib took ~0.3 s of server CPU per new curve (docs/RELIABILITY.md)."""
    values = [100 * a for a in curve]
    n_edits = len(values) - 1
    low, high = min(values), max(values)
    pad = max(1.0, 0.25 * (high - low))
    y_low, y_high = low - pad, high + pad
    left, right, top, bottom = PLOT_BOX
    x = lambda step: left + (PLOT_WIDTH - left - right) * (step / max(1, n_edits))  # noqa: E731
    y = lambda value: top + (PLOT_HEIGHT - top - bottom) * (y_high - value) / (y_high - y_low)  # noqa: E731
    title = f"Held-out accuracy ({n_heldout:,} images not edited)"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PLOT_WIDTH} {PLOT_HEIGHT}" role="img" '
             f'class="accuracy-plot" font-family="sans-serif" font-size="12">',
             f"<title>{html.escape(title)}: {values[0]:.1f}% unedited, {values[-1]:.1f}% after {n_edits} edit(s)</title>",
             f'<rect width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" fill="white"/>',
             f'<text x="{PLOT_WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>']
    for value in value_ticks(y_low, y_high):
        parts.append(f'<line x1="{left}" x2="{PLOT_WIDTH - right}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="#e5e7eb"/><text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>')
    for step in edit_ticks(n_edits):
        parts.append(f'<line x1="{x(step):.1f}" x2="{x(step):.1f}" y1="{top}" y2="{PLOT_HEIGHT - bottom}" '
                     f'stroke="#f3f4f6"/><text x="{x(step):.1f}" y="{PLOT_HEIGHT - bottom + 16}" '
                     f'text-anchor="middle">{step}</text>')
    parts += [f'<rect x="{left}" y="{top}" width="{PLOT_WIDTH - left - right}" height="{PLOT_HEIGHT - top - bottom}" '
              f'fill="none" stroke="#9ca3af"/>',
              f'<text x="{(left + PLOT_WIDTH - right) / 2}" y="{PLOT_HEIGHT - 8}" text-anchor="middle">edits applied</text>',
              f'<text transform="translate(16 {(top + PLOT_HEIGHT - bottom) / 2}) rotate(-90)" text-anchor="middle">'
              "held-out accuracy (%)</text>",
              f'<line x1="{left}" x2="{PLOT_WIDTH - right}" y1="{y(values[0]):.1f}" y2="{y(values[0]):.1f}" '
              f'stroke="#888888" stroke-dasharray="6 4"/>',
              f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="'
              + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in enumerate(values)) + '"/>']
    if n_edits <= MAX_MARKERS:
        parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="#2563eb"/>' for s, v in enumerate(values)]
    if n_edits:
        parts.append(f'<text x="{x(n_edits) - 8:.1f}" y="{y(values[-1]) - 10:.1f}" text-anchor="end" '
                     f'paint-order="stroke" stroke="white" stroke-width="4">'
                     f"{values[-1] - values[0]:+.2f} points</text>")
    legend_y = PLOT_HEIGHT - bottom - 30
    parts += [f'<rect x="{left + 8}" y="{legend_y - 12}" width="250" height="38" fill="white" fill-opacity="0.85" '
              f'stroke="#d1d5db"/>',
              f'<line x1="{left + 14}" x2="{left + 38}" y1="{legend_y}" y2="{legend_y}" stroke="#888888" '
              f'stroke-dasharray="6 4"/><text x="{left + 44}" y="{legend_y + 4}" font-size="11">'
              f"unedited model ({values[0]:.1f}%)</text>",
              f'<line x1="{left + 14}" x2="{left + 38}" y1="{legend_y + 16}" y2="{legend_y + 16}" stroke="#2563eb" '
              f'stroke-width="2"/><text x="{left + 44}" y="{legend_y + 20}" font-size="11">'
              f"{html.escape(model)} model after each edit</text>",
              "</svg>"]
    return "".join(parts)


def data_uri(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _chip(predicted: int, target: int, classes: tuple[str, ...]) -> str:
    kind = "hit" if predicted == target else "miss"
    return f'<span class="chip {kind}">{html.escape(classes[predicted])}</span>'


def views_html(report: EditReport, names: list[str]) -> str:
    """The edited image's augmented views with the unedited and the edited model's prediction on each."""
    target = report.targets[0]
    before = sum(p == target for p in report.views_before)
    after = sum(p == target for p in report.views_after)
    cells = []
    for image, name, b, a in zip(report.views, names, report.views_before, report.views_after):
        cells.append(f'<figure><img src="{data_uri(image)}" alt="{html.escape(name)}"><figcaption>'
                     f'<div class="view-name">{html.escape(name)}</div><div>before {_chip(b, target, report.classes)}</div>'
                     f'<div>after {_chip(a, target, report.classes)}</div></figcaption></figure>')
    return (f'<div class="views"><p><b>Does the fix carry over to small changes of the image?</b> '
            f'{len(names)} shifted, cropped, flipped, re-lit, JPEG-compressed and noisy copies; '
            f'<span class="chip hit">green</span> = predicted as the target <b>{html.escape(report.classes[target])}</b>. '
            f'Before the edit {before}/{len(names)}, after it <b>{after}/{len(names)}</b>. '
            f'(A lookup table would fix only the exact image.)</p><div class="view-grid">{"".join(cells)}</div></div>')


def views_placeholder(text: str) -> str:
    return f'<div class="views"><p>{html.escape(text)}</p></div>'


HEADLINES = {True: "Applied", False: "Rolled back", None: "Checking"}  # None: the guardrail awaits the scoring


def _edit_line(edit: EditReport | EditOutcome) -> str:
    settings = edit.settings
    return (f"{'Reached' if edit.success else 'Did not reach'} *{', '.join(edit.classes[t] for t in edit.targets)}* in "
            f"{edit.steps} step(s), {edit.seconds:.2f} s ({settings.editor}, lr {settings.lr:.3g}, {settings.layers}). ")


def _corrections_line(edit: EditReport | EditOutcome, effect: str) -> str:
    return (f"Corrections{effect}: **{edit.corrections_held} of {edit.n_corrections} hold** (this edit's image(s) and "
            "the session's earlier ones).")


def status_markdown(report: EditReport) -> str:
    change = 100 * (report.heldout_accuracy_after - report.heldout_accuracy_before)
    effect = "" if report.applied else " (would have been)"
    return (f"**{HEADLINES[report.applied]}:** {report.message}  \n{_edit_line(report)}"
            f"Held-out accuracy{effect} {100 * report.heldout_accuracy_before:.2f}% → "
            f"{100 * report.heldout_accuracy_after:.2f}% ({change:+.2f} points): **{report.n_fixed} fixed**, "
            f"**{report.n_broken} broken**, {report.n_changed} of {report.n_heldout:,} changed their prediction. "
            f"{_corrections_line(report, effect)}  \n{SCORING_RULE}")


def outcome_markdown(outcome: EditOutcome, score: HeldOutScore | None, n_total: int) -> str:
    """The status while the held-out images are scored: the edit's outcome and the figures of the rows scored so
    far (`score`), each exact for the images it names."""
    effect = " (would have been)" if outcome.applied is False else ""
    if score is None:
        heldout = f"Held-out accuracy: scoring the {n_total:,} held-out images…"
    else:
        change = 100 * (score.heldout_accuracy_after - score.heldout_accuracy_before)
        heldout = (f"Held-out accuracy{effect} on the first {score.n_rows:,} of {score.n_total:,} images "
                   f"({score.n_heldout:,} scored): {100 * score.heldout_accuracy_before:.2f}% → "
                   f"{100 * score.heldout_accuracy_after:.2f}% ({change:+.2f} points), **{score.n_fixed} fixed**, "
                   f"**{score.n_broken} broken**; scoring the other {score.n_total - score.n_rows:,}…")
    return (f"**{HEADLINES[outcome.applied]}:** {outcome.message}  \n{_edit_line(outcome)}{heldout} "
            f"{_corrections_line(outcome, effect)}  \n{SCORING_RULE}")


SCORING_RULE = ("*Held-out figures leave out every image this session has edited: they say what the edits did to "
                "the images they did not touch.*")


HISTORY_HEADERS = ["#", "images", "target", "editor", "lr", "steps", "seconds", "accuracy before", "accuracy after",
                   "fixed", "broken"]


def history_rows(summaries: list[dict]) -> list[list]:
    """The history table from `EditSession.summaries()`."""
    rows = []
    for s in summaries:
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
    "set with a data root, else a shipped sample of 2,000) until the image is fixed, within a step budget. The "
    "<b>local editor</b> (the page's default) changes the convs of one stage in directions the other images barely use; the "
    "paper's <b>RMSProp</b> editor takes a few gradient steps on the edited layers, and editable training prepares "
    "a model for exactly that. Every method runs on both models. Compare the drop in held-out accuracy and the share "
    "of green views. The corrected image is left out of the held-out figures when it is a held-out image."
)


def _seconds(value: float) -> str:
    return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.1f} s"


def _fixed(outcome) -> str:
    """Whether the method fixed the image, said plainly: a failure's held-out figures are of an unfinished fix."""
    if outcome.success:
        return "✓ yes"
    budget = f" within {outcome.max_steps} steps" if outcome.max_steps is not None else ""
    return f"<b>✗ NOT fixed</b>{budget}: its other figures are those of a fix it did not make"


def compare_html(views: torch.Tensor, names: list[str], outcomes, target: int, classes: tuple[str, ...]) -> str:
    """One row per method: success, steps, time, held-out accuracy change, flips, augmented-view predictions."""
    uris = [data_uri(view) for view in views]
    rows = []
    for o in outcomes:
        hits = sum(p == target for p in o.views_after)
        hits_before = sum(p == target for p in o.views_before)
        strip = "".join(
            f'<img src="{uri}" title="{html.escape(name)}: {html.escape(classes[p])}" '
            f'style="border: 3px solid {"#16a34a" if p == target else "#dc2626"}">'
            for uri, name, p in zip(uris, names, o.views_after))
        change = 100 * (o.accuracy_after - o.accuracy_before)
        rows.append(
            f"<tr><td><b>{html.escape(o.title)}</b><br><small>{html.escape(o.detail)}</small></td>"
            f"<td>{_fixed(o)}</td><td>{o.steps}{'' if o.max_steps is None else f' of up to {o.max_steps}'}</td>"
            f"<td>{_seconds(o.seconds)}</td>"
            f"<td>{100 * o.accuracy_before:.2f}% → {100 * o.accuracy_after:.2f}%<br><b>{change:+.2f} points</b></td>"
            f"<td>{o.n_fixed} / {o.n_broken}</td>"
            f"<td><b>{hits}/{len(names)}</b> at the target (before: {hits_before})<div class='strip'>{strip}</div></td></tr>")
    scored = f" ({outcomes[0].n_heldout:,} images)" if outcomes and outcomes[0].n_heldout else ""
    return (f"<p>{COMPARE_INTRO}</p><table class='compare'><tr><th>Method</th><th>Image fixed?</th><th>Steps taken</th>"
            f"<th>Time</th><th>Held-out accuracy{scored}</th><th>Fixed / broken</th>"
            f"<th>Augmented views predicted as <b>{html.escape(classes[target])}</b> (green) after the fix</th></tr>"
            f"{''.join(rows)}</table>")
