"""Drawing for the Measure tab: the protocol's table, the per-edit drawdowns, the models' training histories.
Inline SVG and HTML as text, like render.accuracy_plot (no matplotlib per request)."""
from __future__ import annotations

import html
import math

from editcore import PROTOCOL_LABELS, MeasureRow

from .render import value_ticks

EDITOR_COLOURS = {"local": "#2563eb", "rmsprop": "#dc2626", "rmsprop-paper": "#ea580c", "gd": "#16a34a",
                  "momentum": "#9333ea", "adam": "#0891b2"}
MODEL_COLOURS = ("#6b7280", "#2563eb", "#16a34a", "#9333ea")  # baseline grey, editable blue, then others
STRIP_WIDTH, STRIP_ROW, STRIP_BOX = 760, 46, (190, 24, 34, 44)  # left, right, top, bottom


def _points(value: float) -> str:
    return f"{100 * value:.2f}"


def _lr(row: MeasureRow) -> str:
    lr = row.editor_hparams.get("lr")
    if row.editor == "local":
        return f"step scale {lr:g}"
    return f"lr {lr:.3g}" + (", learned by editable training" if row.editor_learned else ", default")


def measure_table(rows: list[MeasureRow], editor_labels: dict[str, str]) -> str:
    """The paper's table, one line per model x editor, drawdown with its spread."""
    if not rows:
        return "<p>No results yet: choose the settings and press <b>Run the measurement</b>.</p>"
    first = rows[0]
    lines = []
    for row in rows:
        s = row.summary
        low, high = s["drawdown_ci95"]
        middle_low, middle_high = s["drawdown_middle95"]
        generalization = s.get("generalization")
        lines.append(
            f"<tr><td><b>{html.escape(row.model)}</b></td>"
            f"<td>{html.escape(editor_labels.get(row.editor, row.editor))}<br><small>{html.escape(_lr(row))}, up to "
            f"{row.max_steps} steps on {html.escape(row.layers)}</small></td>"
            f"<td>{_points(s['test_error'])}%</td>"
            f"<td><b>{_points(s['drawdown'])}</b> <small>[{_points(low)}, {_points(high)}]</small></td>"
            f"<td><small>{_points(middle_low)} to {_points(middle_high)}</small></td>"
            f"<td>{100 * s['success_rate']:.1f}%</td><td>{s['mean_steps']:.2f}</td>"
            f"<td>{'—' if generalization is None else f'{generalization:+.3f}'}</td>"
            f"<td>{1000 * s['mean_edit_seconds']:.0f} ms</td><td>{s['n_edits']}</td></tr>")
    overlap = (" The edits are drawn from the held-out images themselves (as <code>evaluate-edits</code> does when "
               "the whole test set is held out), so each edited image is one of them."
               if first.summary.get("edit_source_overlaps_heldout") else "")
    cached = " (stored results: shown without running again)" if all(r.from_cache for r in rows) else ""
    return (
        f"<p><b>{html.escape(PROTOCOL_LABELS.get(first.protocol, first.protocol))}</b>: N = {first.n_edits} seeded edits "
        f"(seed {first.seed}) per model and editor, each from the unedited model, scored on "
        f"{first.summary['n_heldout']:,} held-out images{cached}.{overlap}</p>"
        "<table class='compare measure'><tr><th>Model</th><th>Editor</th><th>Test error</th>"
        "<th>Drawdown, points <small>[95% interval of the mean]</small></th><th>Middle 95% of single edits</th>"
        "<th>Success</th><th>Mean steps</th><th>Generalisation <small>(augmented views moved to the target)</small></th>"
        f"<th>Time per edit</th><th>Edits</th></tr>{''.join(lines)}</table>"
        "<p><small>Drawdown: held-out error after one edit minus before, in percentage points, averaged over the "
        "edits; a negative one means the edit fixed more held-out images than it broke. Time per edit is the "
        "editor's own time on the machine that ran it.</small></p>")


def _jitter(i: int) -> float:
    """A fixed spread in [-1, 1] for the i-th dot (golden-ratio sequence: no randomness, no overlap pattern)."""
    return 2 * ((i * 0.6180339887) % 1.0) - 1


def drawdown_strip(rows: list[MeasureRow], editor_labels: dict[str, str]) -> str:
    """Every edit's drawdown as a dot, one strip per model x editor, with the middle half (box), the middle 95%
    (whiskers) and the mean (diamond), so the spread is seen, not just the mean."""
    if not rows:
        return ""
    left, right, top, bottom = STRIP_BOX
    height = top + bottom + STRIP_ROW * len(rows)
    values = [100 * d for row in rows for d in row.drawdowns()]
    low, high = min(values + [0.0]), max(values + [0.0])
    pad = max(0.2, 0.05 * (high - low))
    x_low, x_high = low - pad, high + pad
    x = lambda value: left + (STRIP_WIDTH - left - right) * (value - x_low) / (x_high - x_low)  # noqa: E731
    title = "Drawdown of each edit (points of held-out accuracy lost)"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {STRIP_WIDTH} {height}" role="img" '
             f'class="drawdown-strip" font-family="sans-serif" font-size="12">',
             f"<title>{html.escape(title)}</title>", f'<rect width="{STRIP_WIDTH}" height="{height}" fill="white"/>',
             f'<text x="{STRIP_WIDTH / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>']
    for value in value_ticks(x_low, x_high, 8):
        parts.append(f'<line x1="{x(value):.1f}" x2="{x(value):.1f}" y1="{top}" y2="{height - bottom}" stroke="#e5e7eb"/>'
                     f'<text x="{x(value):.1f}" y="{height - bottom + 16}" text-anchor="middle">{value:g}</text>')
    parts.append(f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{top}" y2="{height - bottom}" stroke="#6b7280" '
                 f'stroke-dasharray="4 3"/>')
    for k, row in enumerate(rows):
        centre = top + STRIP_ROW * (k + 0.5)
        colour = EDITOR_COLOURS.get(row.editor, "#374151")
        drawdowns = sorted(100 * d for d in row.drawdowns())
        quantile = lambda q: drawdowns[min(len(drawdowns) - 1, int(q * (len(drawdowns) - 1) + 0.5))]  # noqa: E731
        q1, q3, w1, w2 = quantile(0.25), quantile(0.75), quantile(0.025), quantile(0.975)
        mean = 100 * row.summary["drawdown"]
        parts.append(f'<text x="{left - 8}" y="{centre - 2:.1f}" text-anchor="end" font-weight="bold">'
                     f'{html.escape(row.model)}</text><text x="{left - 8}" y="{centre + 12:.1f}" text-anchor="end" '
                     f'fill="{colour}">{html.escape(editor_labels.get(row.editor, row.editor))}</text>')
        parts.append(f'<line x1="{x(w1):.1f}" x2="{x(w2):.1f}" y1="{centre:.1f}" y2="{centre:.1f}" stroke="{colour}"/>'
                     f'<rect x="{x(q1):.1f}" y="{centre - 9:.1f}" width="{max(1.0, x(q3) - x(q1)):.1f}" height="18" '
                     f'fill="{colour}" fill-opacity="0.12" stroke="{colour}"/>')
        for i, value in enumerate(100 * d for d in row.drawdowns()):
            parts.append(f'<circle cx="{x(value):.1f}" cy="{centre + 12 * _jitter(i):.1f}" r="2.6" fill="{colour}" '
                         f'fill-opacity="0.55"/>')
        parts.append(f'<path d="M{x(mean):.1f},{centre - 7:.1f} l6,7 l-6,7 l-6,-7 z" fill="white" stroke="black" '
                     f'stroke-width="1.5"><title>mean {mean:.2f} points</title></path>')
    parts += [f'<text x="{(left + STRIP_WIDTH - right) / 2}" y="{height - 8}" text-anchor="middle">drawdown of one edit '
              '(points); dot = one edit, box = middle half, line = middle 95%, ◇ = mean</text>', "</svg>"]
    return "".join(parts)


# ---- what editable training did ---------------------------------------------------------------------------
PANEL_WIDTH, PANEL_HEIGHT, PANEL_BOX = 360, 230, (58, 12, 48, 34)


def _panel(title: str, series: list[tuple[str, list[tuple[float, float]], str, bool]], note: str = "",
           percent: bool = False) -> str:
    """One small line plot: series of (label, [(epoch, value)], colour, dashed); `note` when there is no data."""
    left, right, top, bottom = PANEL_BOX
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PANEL_WIDTH} {PANEL_HEIGHT}" role="img" '
             f'class="history-panel" font-family="sans-serif" font-size="11">',
             f"<title>{html.escape(title)}</title>", f'<rect width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" fill="white"/>',
             f'<text x="{PANEL_WIDTH / 2}" y="16" text-anchor="middle" font-size="12" font-weight="bold">'
             f"{html.escape(title)}</text>"]
    points = [p for _, pts, _, _ in series for p in pts if math.isfinite(p[1])]
    if not points:
        parts += [f'<text x="{PANEL_WIDTH / 2}" y="{PANEL_HEIGHT / 2}" text-anchor="middle" fill="#6b7280">'
                  f"{html.escape(note or 'not recorded')}</text>", "</svg>"]
        return "".join(parts)
    scale = 100 if percent else 1
    xs, ys = [p[0] for p in points], [scale * p[1] for p in points]
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    y_low, y_high = min(ys), max(ys)
    pad = max(abs(y_high) * 0.02, 1e-6) if y_high == y_low else 0.08 * (y_high - y_low)
    y_low, y_high = y_low - pad, y_high + pad
    x = lambda e: left + (PANEL_WIDTH - left - right) * (e - x_low) / (x_high - x_low)  # noqa: E731
    y = lambda v: top + (PANEL_HEIGHT - top - bottom) * (y_high - v) / (y_high - y_low)  # noqa: E731
    ticks = value_ticks(y_low, y_high, 4)
    for value in ticks:
        parts.append(f'<line x1="{left}" x2="{PANEL_WIDTH - right}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="#e5e7eb"/><text x="{left - 4}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f'{tick_label(value, ticks)}</text>')
    for epoch in value_ticks(x_low, x_high, 5):
        if float(epoch).is_integer():
            parts.append(f'<text x="{x(epoch):.1f}" y="{PANEL_HEIGHT - bottom + 14}" text-anchor="middle">{epoch:g}</text>')
    parts.append(f'<text x="{(left + PANEL_WIDTH - right) / 2}" y="{PANEL_HEIGHT - 4}" text-anchor="middle">epoch</text>')
    legend_x, legend_y = left, 32  # one row under the title, clear of the lines
    for label, pts, colour, dashed in series:
        pts = [(e, scale * v) for e, v in pts if math.isfinite(v)]
        if not pts:
            continue
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        if legend_x + 20 + 6 * len(label) > PANEL_WIDTH:  # wrap the legend
            legend_x, legend_y = left, legend_y + 12
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="'
                     + " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in pts) + '"/>')
        if len(pts) <= 12:
            parts += [f'<circle cx="{x(e):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>' for e, v in pts]
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}" '
                     f'stroke-width="2"{dash}/><text x="{legend_x + 20}" y="{legend_y + 4}">{html.escape(label)}</text>')
        legend_x += 30 + 6 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def tick_label(value: float, ticks: list[float]) -> str:
    """A tick as short as its neighbours allow: enough decimals to tell them apart."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    if max(abs(t) for t in ticks) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.{max(0, -math.floor(math.log10(step)))}f}"


def _series(history: list[dict], key: str, offset: int = 0) -> list[tuple[float, float]]:
    out = []
    for record in history:
        value = record.get(key)
        if isinstance(value, dict):  # the editor's hyper-parameters
            continue
        if isinstance(value, (int, float)):
            out.append((record["epoch"] + offset, float(value)))
    return out


def _editor_series(history: list[dict], key: str, offset: int = 0) -> list[tuple[float, float]]:
    return [(r["epoch"] + offset, float(r["editor"][key])) for r in history
            if isinstance(r.get("editor"), dict) and key in r["editor"]]


def training_history(cards: dict[str, dict], paths: dict[str, str]) -> str:
    """The models' training histories from their cards, side by side, and a paragraph on the objective.
    `paths`: each model's checkpoint file name (an editable model whose card's `init` names the baseline's file
    is drawn as continuing it)."""
    baseline = next((n for n, c in cards.items() if c.get("objective") != "editable"), None)
    editable = next((n for n, c in cards.items() if c.get("objective") == "editable"), None)
    offsets = {name: 0 for name in cards}
    continued = ""
    if baseline and editable:
        init = str(cards[editable].get("init") or "")
        if init and init.replace("\\", "/").rsplit("/", 1)[-1] == paths[baseline] and cards[baseline].get("history"):
            offsets[editable] = int(cards[baseline]["history"][-1]["epoch"])
            continued = (f" Its card's <code>init</code> names a file called <code>{html.escape(paths[baseline])}</code>, "
                         f"so its epochs are drawn after the {baseline} model's {offsets[editable]}.")
    colours = {name: MODEL_COLOURS[min(k, len(MODEL_COLOURS) - 1)] if cards[name].get("objective") != "editable"
               else "#2563eb" for k, name in enumerate(cards)}
    hist = {name: card.get("history") or [] for name, card in cards.items()}

    def both(key: str) -> list:
        return [(name, _series(hist[name], key, offsets[name]), colours[name], False) for name in cards]

    panels = [
        _panel("Test accuracy (%)", both("test_accuracy"), percent=True),
        _panel("L_base: cross-entropy on training batches", both("loss_base")),
        _panel("L_edit and L_loc (editable training only)",
               [(f"{name}: L_edit", _series(hist[name], "loss_edit", offsets[name]), colours[name], False)
                for name in cards] +
               [(f"{name}: L_loc", _series(hist[name], "loss_loc", offsets[name]), colours[name], True) for name in cards],
               note="no model here was trained for edits"),
        _panel("Held-out error and drawdown (%)",
               [(f"{name}: error", _series(hist[name], "val_error", offsets[name]), colours[name], False)
                for name in cards] +
               [(f"{name}: drawdown", _series(hist[name], "val_drawdown", offsets[name]), colours[name], True)
                for name in cards],
               note="not recorded: trained without --val-size", percent=True),
        _panel("Editor learning rate", [(name, _editor_series(hist[name], "lr", offsets[name]), colours[name], False)
                                        for name in cards], note="no editor was learned"),
        _panel("Editor beta (RMSProp's decay)", [(name, _editor_series(hist[name], "beta", offsets[name]), colours[name],
                                                  False) for name in cards], note="no editor beta was learned"),
    ]
    return (f"<div class='history'><p>{objective_paragraph(cards.get(editable) if editable else None)}{continued}</p>"
            f"<div class='history-grid'>{''.join(panels)}</div>{history_facts(cards)}</div>")


def objective_paragraph(card: dict | None) -> str:
    """One paragraph on editable training's objective, with the shipped model's own settings from its card."""
    text = ("A baseline is trained on L_base alone: the cross-entropy of its "
            "predictions on training images. Editable training (Sinitsin et al., 2020) adds two terms for every "
            "training step. It picks a training image and a target class and lets the editor take up to k gradient "
            "steps on the editable layers; <b>L_edit</b> is the loss of that edit (zero once the target is the top "
            "class), so training rewards weights that one short edit can move; <b>L_loc</b> is the KL divergence "
            "between the predictions on other training images before and after the edit, so training rewards edits "
            "that leave the rest alone. The loss is L_base + c_edit·L_edit + c_loc·L_loc, back-propagated through the "
            "edit's own steps, and the editor's learning rate or RMSProp's beta can be learned with the weights.")
    if not card:
        return text
    config = card.get("train_config", {})
    editor = card.get("editor") or {}
    return text + (f" The {html.escape(str(card.get('objective')))} model here: c_edit = {config.get('c_edit')}, "
                   f"c_loc = {config.get('c_loc')}, the {html.escape(str(config.get('editor')))} editor on "
                   f"{html.escape(str(card.get('editable_prefix')))}, k = {config.get('max_steps')} steps, "
                   f"{config.get('order', 'second')}-order, {card.get('epochs')} epoch(s)"
                   + (f" from {html.escape(str(card.get('init')).replace(chr(92), '/').rsplit('/', 1)[-1])}"
                      if card.get("init") else " from scratch")
                   + (f", epoch {card['best_epoch']} kept" if "best_epoch" in card else "")
                   + (f"; its editor ended at {_editor_settings(editor, card.get('editor_trained'))}" if "lr" in editor
                      else "") + ".")


def _editor_settings(editor: dict, trained: list[str] | None) -> str:
    """'lr 0.001 (fixed), beta 0.210 (learned)': `trained` names the editor's learned parameters (log_lr,
    logit_beta, ...; older cards have none: all learned)."""
    return ", ".join(f"{name} {editor[name]:.3g} ({'learned' if trained is None or any(name in t for t in trained) else 'fixed'})"
                     for name in editor if name != "name")


def history_facts(cards: dict[str, dict]) -> str:
    rows = "".join(
        f"<tr><td><b>{html.escape(name)}</b></td><td>{html.escape(str(card.get('objective')))}</td>"
        f"<td>{card.get('epochs')}</td><td>{100 * card['test_accuracy']:.1f}%</td>"
        f"<td><code>{html.escape(str(card.get('command', '')))}</code></td></tr>"
        for name, card in cards.items() if card.get("test_accuracy") is not None)
    return ("<table class='compare'><tr><th>Model</th><th>Objective</th><th>Epochs</th><th>Test accuracy</th>"
            f"<th>Command (from its card)</th></tr>{rows}</table>")


CSS = """
.history-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 8px; margin: 8px 0; }
.history-grid svg { width: 100%; height: auto; }
.drawdown-strip { width: 100%; max-width: 900px; height: auto; }
table.measure td { white-space: nowrap; }
"""
