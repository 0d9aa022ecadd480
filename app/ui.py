"""The EditLab page: layout and event wiring over editcore's Lab / Workspace / EditSession.

Every handler finds the caller's workspace by the Gradio session hash, so each browser tab (and each
gradio_client) has its own edits; the models and held-out caches inside `Lab` are shared.
"""
import contextvars
import functools
import inspect
import json
import os
import queue
import re
import secrets
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import gradio as gr

from editcore import (DEFAULT_EDITOR, EDITORS, SOURCE_TEST, SOURCE_UPLOADS, BrowseQuery, EditOutcome, EditReport,
                      EditSettings, HeldOutScore, ImageError, ImageRef, Lab, SettingsError, compare_fixes,
                      hyperparameter_text, read_log, replay_summary, view_names)

from . import render, render_measure
from .measure_tab import MeasureHandlers, build_measure_tab

EDITOR_LABELS = {"local": "Local (projected)", "rmsprop": "RMSProp", "rmsprop-paper": "RMSProp (paper code)",
                 "gd": "Gradient descent", "momentum": "Momentum", "adam": "Adam"}
SORT_LABELS = {"index": "image index", "confidence-asc": "confidence, lowest first",
               "confidence-desc": "confidence, highest first", "loss-desc": "loss, highest first"}
ALL_CLASSES = "all"
PAGE_SIZE = 24
MAX_LOG_UPLOAD_BYTES = 20_000_000
MAX_EXPORT_FILES = 200  # the newest exports (weights, cards, logs) kept for download
OUTCOME_WAIT_S = 5.0  # longest the held-out scoring waits for Gradio to send an edit's outcome
INTRO = (
    "**Find a wrong prediction, fix it, and see what the fix costs.** An *editable* network "
    "(Sinitsin et al., “Editable Neural Networks”, ICLR 2020) is trained so that a few gradient steps on one "
    "misclassified example correct it while leaving its other predictions alone. Pick a misclassified image, "
    "choose its true label and press **Apply edit**: the page shows whether the edit worked, how accuracy on "
    "held-out images moved, which of them changed their prediction, and whether the fix carries over to shifted, "
    "flipped or re-lit copies of the image. Switch between the baseline-trained and the editable-trained model to "
    "compare them."
)


def user_errors(fn):
    """Turn editcore's refusals into a message in the page (state is unchanged: they are raised first)."""
    refusals = (SettingsError, ImageError, FileNotFoundError)
    if inspect.isgeneratorfunction(fn):  # Gradio streams a generator's yields: it must stay one
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except refusals as exc:
                raise gr.Error(str(exc), title="Not possible") from None
        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except refusals as exc:
            raise gr.Error(str(exc), title="Not possible") from None
    return wrapper


def _editor_fields(shared, editor: str, session_layers: str | None = None):
    """Learning rate, max steps and layers for a model and editor: the editor's defaults (the learned
    rate as a hint); the layers stay those of the session's edits while it has any."""
    learned = shared.learned_hyperparameters(editor)
    hint = ("step scale: 1 = the smallest step that reaches the margin" if editor == "local" else
            f"default for {EDITOR_LABELS[editor]}" + (
                f"; editable training learned {hyperparameter_text(learned)} for this model: the comparison below "
                "runs it" if learned else ""))
    return (gr.update(value=EDITORS[editor].default_lr, info=hint), gr.update(value=EDITORS[editor].default_max_steps),
            gr.update(choices=list(shared.layer_choices), value=session_layers or shared.layers_for(editor)))


def _session_key(request) -> str:
    return getattr(request, "session_hash", None) or "default"


class Handlers:
    """The page's event handlers as plain methods (tests call them with a stand-in request)."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.classes = lab.classes
        self.export_dir = Path(tempfile.mkdtemp(prefix="editlab-exports-"))
        self._export_lock = threading.Lock()
        self.view_names = view_names()

    def workspace(self, request):
        return self.lab.registry.get(_session_key(request))

    # ---- pieces of the page -------------------------------------------------------------------
    def _browse_outputs(self, ws, query=None):
        page = ws.browse(query=query)
        info = (f"Page **{page.page}** of {page.n_pages} · {page.total:,} image(s) match"
                if page.total else "No image matches these filters.")
        return render.gallery(page.items, self.classes), info

    def _selection_outputs(self, ws):
        """Selected image (large), its description, the current model's top-k, the default target."""
        if ws.selection is None:
            return None, "Click an image in the gallery to inspect and edit it.", None, gr.update()
        ref, image, label = ws.selected()
        topk = ws.session(ws.model).topk(image)
        predicted = self.classes.index(topk[0][0])
        target = self.classes[label] if label >= 0 else self.classes[predicted]
        info = render.selection_info(self.lab.short_source_label(ref.source), ref.index, label, topk, self.classes)
        return render.large_image(image, ws.original(ref)), info, dict(topk), target

    def _flip_outputs(self, before, after, fixed, broken):
        heldout = self.lab.sources[SOURCE_TEST].images
        return (render.flip_gallery(heldout, before, after, fixed, self.classes),
                render.flip_gallery(heldout, before, after, broken, self.classes))

    def _state_outputs(self, ws, message: str, summary: dict | None = None):
        """The effect panel for the session as it now stands (after undo, reset, a model switch...)."""
        session = ws.session(ws.model)
        curve, n_scored = session.accuracy_curve(), int(session.scored_rows().sum())
        flips = session.last_flips()
        fixed_gallery, broken_gallery = self._flip_outputs(*flips) if flips else ([], [])
        report = {"model": ws.model, "edits": len(session.history), "heldout_accuracy": curve[-1],
                  "heldout_accuracy_base": curve[0], "n_heldout": n_scored, "message": message, **(summary or {})}
        image, info, topk, _ = self._selection_outputs(ws)
        return (report, message, topk, info, render.accuracy_plot(curve, ws.model, n_scored),
                render.views_placeholder("Apply an edit to see how the edited model treats shifted, flipped and "
                                         "re-lit copies of the image."),
                fixed_gallery, broken_gallery, render.history_rows(session.summaries()), *self._browse_outputs(ws))

    def _report_outputs(self, ws, report, shown: EditOutcome | None = None):
        """The effect panel for an edit's report; what the page already shows from its outcome (`shown`, when
        its verdict did not wait for the scoring: the same top-k, description and views) is not sent again."""
        session = ws.session(ws.model)
        fixed_gallery, broken_gallery = self._flip_outputs(report.predictions_before, report.predictions_after,
                                                           report.fixed_rows, report.broken_rows)
        if shown is not None and shown.applied is not None:
            info = topk = views = gr.update()
        else:
            _, info, topk, _ = self._selection_outputs(ws)
            views = render.views_html(report, self.view_names)
        plot = render.accuracy_plot(session.accuracy_curve(), ws.model, int(session.scored_rows().sum()))
        return (report.to_dict(), render.status_markdown(report), topk, info, plot, views, fixed_gallery,
                broken_gallery, render.history_rows(session.summaries()), *self._browse_outputs(ws))

    def _outcome_outputs(self, ws, outcome: EditOutcome, score: HeldOutScore | None):
        """The effect panel while the held-out images are scored: the edit's outcome, with `score` the figures
        so far. The report, plot, flip sets, history and browse page wait for the whole held-out set."""
        status = render.outcome_markdown(outcome, score, len(self.lab.sources[SOURCE_TEST]))
        if score is not None:
            return (gr.update(), status, *[gr.update()] * 9)
        ref = outcome.refs[0]
        info = render.selection_info(self.lab.short_source_label(ref.source), ref.index, ws.image(ref)[1], outcome.topk,
                                     self.classes)
        return (gr.update(), status, dict(outcome.topk), info, gr.update(), render.views_html(outcome, self.view_names),
                *[gr.update()] * 5)

    def _settings(self, editor, lr, max_steps, layers, max_drop) -> EditSettings:
        return EditSettings(editor=editor, lr=lr, max_steps=max_steps, layers=layers or "",
                            max_drop=None if max_drop in (None, "", 0) else max_drop)

    # ---- events -------------------------------------------------------------------------------
    @user_errors
    def on_load(self, request: gr.Request):
        ws = self.workspace(request)
        ws.query = BrowseQuery(misclassified=True, page_size=PAGE_SIZE)
        ws.browse()
        if ws.page_refs:
            ws.select(ws.page_refs[0])
        shared = self.lab.models[ws.model]
        image, _, _, target = self._selection_outputs(ws)
        state = self._state_outputs(ws, "No edits yet: pick an image, choose its correct label and press **Apply edit**.")
        return (gr.update(value=ws.model), *_editor_fields(shared, DEFAULT_EDITOR), image, target, *state)

    def unload(self, request: gr.Request):
        self.lab.registry.drop(_session_key(request))

    @user_errors
    def browse(self, source, label, misclassified, min_confidence, max_confidence, sort, request: gr.Request):
        ws = self.workspace(request)
        low, high = sorted((float(min_confidence or 0), float(max_confidence if max_confidence is not None else 1)))
        query = BrowseQuery(source=source, label=None if label in (None, ALL_CLASSES) else self.classes.index(label),
                            misclassified=bool(misclassified), min_confidence=low, max_confidence=high, sort=sort,
                            page=1, page_size=PAGE_SIZE)
        return self._browse_outputs(ws, query)

    @user_errors
    def previous_page(self, request: gr.Request):
        ws = self.workspace(request)
        return self._browse_outputs(ws, replace(ws.query, page=ws.query.page - 1))

    @user_errors
    def next_page(self, request: gr.Request):
        ws = self.workspace(request)
        return self._browse_outputs(ws, replace(ws.query, page=ws.query.page + 1))

    @user_errors
    def select_from_gallery(self, event: gr.SelectData, request: gr.Request):
        ws = self.workspace(request)
        ws.select_on_page(event.index)
        return self._selection_outputs(ws)

    @user_errors
    def select_image(self, source: str, index: float, request: gr.Request):
        """API /select_image: pick image `index` of `source` ('test', 'nae' or 'uploads')."""
        ws = self.workspace(request)
        ws.select(ImageRef(source, index))  # refuses 2.5, 'abc', NaN with a message
        return self._selection_outputs(ws)

    @user_errors
    def set_model(self, model: str, request: gr.Request):
        ws = self.workspace(request)
        session = ws.use_model(model)
        shared = self.lab.models[model]
        return (gr.update(value=DEFAULT_EDITOR), *_editor_fields(shared, DEFAULT_EDITOR, session.layers if session.history else None),
                *self._state_outputs(ws, f"Showing the {model} model ({len(session.history)} edit(s) in this session)."))

    def editor_changed(self, model: str, editor: str, request: gr.Request):
        if model not in self.lab.models or editor not in EDITORS:
            return gr.update(), gr.update(), gr.update()
        session = self.workspace(request).session(model)
        return _editor_fields(self.lab.models[model], editor, session.layers if session.history else None)

    @user_errors
    def apply_edit(self, target: str, model: str, editor: str, lr: float, max_steps: float, layers: str,
                   max_drop: float, request: gr.Request, progress=gr.Progress()):
        """API /apply_edit: edit the selected image to `target`; returns the report first."""
        ws = self.workspace(request)
        if target not in self.classes:
            raise SettingsError(f"target must be one of {', '.join(self.classes)}, got {target!r}")
        settings = self._settings(editor, lr, max_steps, layers, max_drop)
        report = ws.apply(model, self.classes.index(target), settings, lambda fraction, stage: progress(fraction, desc=stage))
        return self._report_outputs(ws, report)

    @user_errors
    def apply_edit_progressively(self, target: str, model: str, editor: str, lr: float, max_steps: float, layers: str,
                                 max_drop: float, request: gr.Request, progress=gr.Progress()):
        """The page's Apply (API /apply_edit_progressive): /apply_edit's outputs in steps. First the edit's
        outcome (verdict or 'checking', steps, the image's new top-k, the augmented views), then, on a held-out
        set larger than its first part, that part's figures, then everything /apply_edit returns."""
        ws = self.workspace(request)
        if target not in self.classes:
            raise SettingsError(f"target must be one of {', '.join(self.classes)}, got {target!r}")
        settings = self._settings(editor, lr, max_steps, layers, max_drop)
        news, outcome_sent = queue.SimpleQueue(), threading.Event()

        def hand_over(outcome: EditOutcome):
            # The scoring waits until Gradio has sent the outcome (it resumes the generator only then): on a busy
            # CPU the two would share the cores and the outcome would reach the page later.
            news.put(outcome)
            outcome_sent.wait(OUTCOME_WAIT_S)

        def run():
            try:
                news.put(ws.apply(model, self.classes.index(target), settings,
                                  lambda fraction, stage: progress(fraction, desc=stage), hand_over, news.put))
            except Exception as exc:  # noqa: BLE001 - raised again below, in the event's own thread
                news.put(exc)

        # The edit runs start to end in a thread of its own: Gradio may resume a generator on another thread
        # after each yield, and the workspace's lock and the model replica it holds belong to one thread.
        threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True).start()
        outcome = None
        try:
            while not isinstance(item := news.get(), (EditReport, Exception)):
                outcome = item if isinstance(item, EditOutcome) else outcome  # the outcome comes before any score
                yield self._outcome_outputs(ws, outcome, item if isinstance(item, HeldOutScore) else None)
                outcome_sent.set()
        finally:
            outcome_sent.set()  # a client gone (the generator closed) must not hold the edit
        if isinstance(item, Exception):
            raise item
        yield self._report_outputs(ws, item, outcome)

    @user_errors
    def undo(self, request: gr.Request):
        ws = self.workspace(request)
        session = ws.session(ws.model)
        undone = session.summaries()[-1] if session.history else None
        session.undo()
        message = f"Undid edit {undone['edit']}." if undone else "Nothing to undo: the model is unedited."
        return self._state_outputs(ws, message, {"undone": undone})

    @user_errors
    def reset(self, request: gr.Request):
        ws = self.workspace(request)
        dropped = ws.session(ws.model).reset()
        return self._state_outputs(ws, f"Reset the {ws.model} model to its trained weights ({dropped} edit(s) dropped).",
                                   {"dropped": dropped})

    @user_errors
    def history(self, request: gr.Request):
        """API /history: this session's applied edits of the model on screen."""
        ws = self.workspace(request)
        return ws.session(ws.model).summaries()

    @user_errors
    def upload(self, files, request: gr.Request):
        ws = self.workspace(request)
        paths = [getattr(f, "name", f) for f in (files if isinstance(files, list) else [files] if files else [])]
        refs = ws.add_uploads(paths)
        ws.select(refs[0])
        gallery, info = self._browse_outputs(ws, BrowseQuery(source=SOURCE_UPLOADS, page=10**9, page_size=PAGE_SIZE))
        size = self.lab.domain.size
        message = (f"Added {len(refs)} image(s), resized to {size}×{size}. They have no true label: choose the label "
                   "you want in the edit panel.")
        filters = (SOURCE_UPLOADS, ALL_CLASSES, False, 0.0, 1.0, "index")  # the query just shown
        return (*filters, gallery, info, message, *self._selection_outputs(ws))

    @user_errors
    def compare(self, target: str, editor: str, max_steps: float, request: gr.Request, progress=gr.Progress()):
        """API /compare: the selected correction by every method on every model (lookup tables, fine-tuning, the
        local editor, the paper's editor, and the selected editor), each from its unedited model; the session's own edits are
        not touched."""
        ws = self.workspace(request)
        if target not in self.classes:
            raise SettingsError(f"target must be one of {', '.join(self.classes)}, got {target!r}")
        settings = EditSettings(editor=editor, max_steps=max_steps).resolved(self.lab.models[ws.model])
        ref, image, _ = ws.selected()
        progress(0.0, desc="loading training images for fine-tuning's replay")
        views, outcomes = compare_fixes(self.lab.models, image, self.classes.index(target), settings.editor,
                                        settings.max_steps, self.lab.replay_set(),
                                        heldout_row=ref.index if ref.source == SOURCE_TEST else None,
                                        progress=lambda fraction, stage: progress(fraction, desc=stage))
        return render.compare_html(views, self.view_names, outcomes, self.classes.index(target), self.classes), \
            [o.to_dict() for o in outcomes]

    @user_errors
    def add_to_batch(self, target: str, request: gr.Request):
        ws = self.workspace(request)
        if target not in self.classes:
            raise SettingsError(f"target must be one of {', '.join(self.classes)}, got {target!r}")
        return self._batch_text(ws.add_to_batch(self.classes.index(target)))

    @user_errors
    def clear_batch(self, request: gr.Request):
        ws = self.workspace(request)
        ws.batch = []
        return self._batch_text([])

    def _batch_text(self, batch) -> str:
        if not batch:
            return "The batch is empty. Select an image, choose its label, press **Add to batch**."
        return "**Batch:** " + ", ".join(f"{ref.source}:{ref.index} → {self.classes[t]}" for ref, t in batch)

    @user_errors
    def apply_batch(self, model: str, editor: str, lr: float, max_steps: float, layers: str, max_drop: float,
                    request: gr.Request, progress=gr.Progress()):
        ws = self.workspace(request)
        settings = self._settings(editor, lr, max_steps, layers, max_drop)
        report = ws.apply_batch(model, settings, lambda fraction, stage: progress(fraction, desc=stage))
        return (*self._report_outputs(ws, report), self._batch_text(ws.batch))

    def _export_path(self, stem: str, suffix: str) -> Path:
        """A new file in the app's own export folder. Its name is generated here, never built from a client
        value (the session hash is chosen by the client: '../..' or an absolute path must not pick a folder)."""
        safe_stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)  # model names come from the operator's --checkpoint
        # Every export is a new file, so the folder keeps only the newest MAX_EXPORT_FILES (disk stays bounded).
        with self._export_lock:  # two handlers pruning at once would stat each other's deleted files
            files = sorted(self.export_dir.iterdir(), key=lambda f: f.stat().st_mtime_ns)
            for old in files[: max(0, len(files) - MAX_EXPORT_FILES + 2)]:  # + 2: a weights export writes two files
                old.unlink()
        return self.export_dir / f"{safe_stem}-{secrets.token_hex(8)}{suffix}"

    @user_errors
    def export_weights(self, request: gr.Request):
        ws = self.workspace(request)
        session = ws.session(ws.model)
        path = session.export_weights(self._export_path(f"editlab-{ws.model}-{len(session.history)}edits", ".safetensors"))
        return gr.update(value=[str(path), str(path.with_suffix(".json"))], visible=True)

    @user_errors
    def export_log(self, request: gr.Request):
        ws = self.workspace(request)
        path = self._export_path(f"editlab-{ws.model}-edit-log", ".json")
        path.write_text(json.dumps(ws.session(ws.model).log(), indent=1) + "\n")
        return gr.update(value=[str(path)], visible=True)

    @user_errors
    def replay_log(self, file, request: gr.Request):
        ws = self.workspace(request)
        path = getattr(file, "name", file)
        if not path or not os.path.isfile(path):
            raise SettingsError("no edit log was uploaded")
        if os.path.getsize(path) > MAX_LOG_UPLOAD_BYTES:
            raise SettingsError(f"the edit log is larger than {MAX_LOG_UPLOAD_BYTES // 1_000_000} MB")
        log = read_log(Path(path).read_bytes())
        model = log.get("model") if isinstance(log, dict) and log.get("model") in self.lab.models else ws.model
        reports = ws.replay(model, log)
        return (gr.update(value=model), *self._state_outputs(ws, *replay_summary(log, reports, ws.session(model))))


@functools.cache
def _serve_image_files() -> None:
    """Once per process (Gradio's static paths are global): served as they are, no copy, hash or re-encode."""
    gr.set_static_paths([render.IMAGE_FILES.folder])


def build_demo(lab: Lab) -> gr.Blocks:
    handlers = Handlers(lab)
    _serve_image_files()
    model_choices = [(f"{name} — {lab.models[name].description.split(': ', 1)[1]}", name) for name in lab.models]
    first = lab.models[next(iter(lab.models))]
    heldout = lab.sources[SOURCE_TEST]
    with gr.Blocks(title="EditLab — editable neural networks", analytics_enabled=False) as demo:
        gr.Markdown("# EditLab")
        gr.Markdown(INTRO, elem_classes="intro")
        described = (f"{len(heldout):,} CIFAR-10 test images"
                     f"{' (the embedded sample; pass --data-root for all 10,000)' if len(heldout) < 10000 else ''}"
                     if heldout.source.startswith("cifar10") else lab.source_label(SOURCE_TEST))
        gr.Markdown(f"Held-out set: {described}; "
                    "every held-out figure leaves out the images you have edited. "
                    "Your edits are private to this browser tab and vanish when you close it.")
        if lab.notes:
            gr.Markdown("\n".join(f"⚠️ {note}" for note in lab.notes), elem_classes="notes")
        model = gr.Radio(model_choices, value=next(iter(lab.models)), label="Model to edit", elem_id="model")

        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                gr.Markdown("### 1 · Browse")
                with gr.Row():
                    source = gr.Dropdown([(lab.source_label(s), s) for s in lab.source_names()], value=SOURCE_TEST,
                                         label="Images", elem_id="source", scale=3)
                    label_filter = gr.Dropdown([("all classes", ALL_CLASSES), *[(c, c) for c in lab.classes]],
                                               value=ALL_CLASSES, label="True class", elem_id="class-filter", scale=2)
                    sort = gr.Dropdown([(v, k) for k, v in SORT_LABELS.items()], value="index", label="Sort by",
                                       elem_id="sort", scale=2)
                with gr.Row():
                    misclassified = gr.Checkbox(value=True, label="Misclassified only", elem_id="misclassified")
                    min_confidence = gr.Slider(0, 1, value=0, step=0.05, label="Confidence from")
                    max_confidence = gr.Slider(0, 1, value=1, step=0.05, label="to")
                browse_gallery = gr.Gallery(label="Click an image to inspect it · caption: true label → model's prediction",
                                            elem_id="browse-gallery", columns=6, height=560, allow_preview=False,
                                            object_fit="contain", interactive=False)
                with gr.Row():
                    prev_page = gr.Button("← Previous page", size="sm")
                    page_info = gr.Markdown(elem_id="page-info")
                    next_page = gr.Button("Next page →", size="sm")
                with gr.Row(equal_height=False):
                    # No precision: Gradio would round 2.5 to 2 before select_image could refuse it.
                    jump_index = gr.Number(label="Image index", value=0, step=1, elem_id="jump-index",
                                           min_width=100, scale=1)
                    with gr.Column(scale=2):
                        jump = gr.Button("Open image by index", size="sm")
                        upload = gr.UploadButton("Upload your own images", file_count="multiple",
                                                 file_types=["image"], size="sm", elem_id="upload")
                upload_info = gr.Markdown()

            with gr.Column(scale=4):
                gr.Markdown("### 2 · Inspect and edit")
                with gr.Row():
                    side_by_side = heldout.paths is not None
                    selected = gr.Image(label="Selected image: the picture, and what the model sees" if side_by_side
                                        else "Selected image", interactive=False, height=256,
                                        width=512 if side_by_side else 256,
                                        elem_id="selected-image", buttons=[])
                    with gr.Column():
                        info = gr.Markdown(elem_id="selected-info")
                        topk = gr.Label(num_top_classes=5, label="Model's top-5", elem_id="topk")
                target = gr.Dropdown(list(lab.classes), value=lab.classes[0], label="Correct label (the edit's target)",
                                     elem_id="target")
                with gr.Row():
                    editor = gr.Dropdown([(v, k) for k, v in EDITOR_LABELS.items()], value=DEFAULT_EDITOR,
                                         label="Editor", elem_id="editor")
                    lr = gr.Number(value=EDITORS[DEFAULT_EDITOR].default_lr, label="Learning rate", elem_id="lr")
                with gr.Row():
                    max_steps = gr.Number(value=EDITORS[DEFAULT_EDITOR].default_max_steps, label="Max steps",
                                          elem_id="max-steps")
                    layers = gr.Dropdown(list(first.layer_choices), value=first.layers_for(DEFAULT_EDITOR),
                                         label="Editable layers", elem_id="layers")
                    max_drop = gr.Number(value=0, label="Guardrail: max accuracy drop", elem_id="max-drop",
                                         info="in points; 0 = off")
                with gr.Row():
                    apply = gr.Button("Apply edit", variant="primary", elem_id="apply")
                    undo = gr.Button("Undo", elem_id="undo")
                    reset = gr.Button("Reset", elem_id="reset")

        gr.Markdown("### 3 · Effect of the edit")
        status = gr.Markdown(elem_id="status")
        with gr.Row(equal_height=False):
            plot = gr.HTML(label="Held-out accuracy after each edit", elem_id="accuracy-plot", scale=2, container=True)
            views = gr.HTML(elem_id="views", padding=True, scale=3)
        with gr.Row():
            fixed_gallery = gr.Gallery(label="Flip set: held-out images this edit fixed (prediction before → after)",
                                       elem_id="fixed-gallery", columns=8, height=260, allow_preview=False,
                                       interactive=False)
            broken_gallery = gr.Gallery(label="Flip set: held-out images this edit broke (prediction before → after)",
                                        elem_id="broken-gallery", columns=8, height=260, allow_preview=False,
                                        interactive=False)
        with gr.Accordion("Report (JSON, as returned by the /apply_edit API)", open=False):
            report = gr.JSON(elem_id="report")

        with gr.Tabs():
            with gr.Tab("History and export"):
                history_table = gr.Dataframe(headers=render.HISTORY_HEADERS, interactive=False, elem_id="history",
                                             wrap=True)
                with gr.Row():
                    export_weights = gr.Button("Export edited weights (safetensors)")
                    export_log = gr.Button("Export edit log (JSON)")
                    replay = gr.UploadButton("Replay an edit log", file_types=[".json"], elem_id="replay")
                export_files = gr.File(label="Downloads", file_count="multiple", interactive=False, visible=False)
                with gr.Accordion("History as JSON (the /history API)", open=False):
                    history_button = gr.Button("Refresh", size="sm")
                    history_json = gr.JSON()
            with gr.Tab("Compare methods"):
                gr.Markdown("Correct the selected image to the chosen label with lookup tables, fine-tuning, the local "
                            "editor and the paper's editor, as the editable model learned it (and the editor selected "
                            "above, if another) on each model, "
                            "side by side, each from the unedited weights. Your session's edits are not changed.")
                compare_button = gr.Button("Compare methods on the selected image", variant="primary",
                                           elem_id="compare")
                compare_table = gr.HTML(elem_id="compare-table")
                with gr.Accordion("Comparison as JSON (the /compare API)", open=False):
                    compare_json = gr.JSON()
            with gr.Tab("Batch edit"):
                gr.Markdown("Edit several images in one go: select each, choose its label, press **Add to batch**; "
                            "then **Apply batch edit** runs one edit that must fix all of them at once.")
                batch_info = gr.Markdown(handlers._batch_text([]))
                with gr.Row():
                    add_batch = gr.Button("Add selected image to batch")
                    apply_batch = gr.Button("Apply batch edit", variant="primary")
                    clear_batch = gr.Button("Clear batch")
            measure_handlers = MeasureHandlers(lab, handlers._export_path, EDITOR_LABELS)
            build_measure_tab(lab, measure_handlers)

        # ---- wiring ----
        browse_outputs = [browse_gallery, page_info]
        selection_outputs = [selected, info, topk, target]
        effect_outputs = [report, status, topk, info, plot, views, fixed_gallery, broken_gallery, history_table,
                          browse_gallery, page_info]
        settings_inputs = [editor, lr, max_steps, layers, max_drop]
        filters = [source, label_filter, misclassified, min_confidence, max_confidence, sort]

        demo.load(handlers.on_load, outputs=[model, lr, max_steps, layers, selected, target, *effect_outputs],
                  api_visibility="private")
        demo.unload(handlers.unload)
        demo.unload(measure_handlers.unload)  # a closed tab's protocol run stops after its current edit
        for control in (source, label_filter, misclassified, sort):
            control.input(handlers.browse, filters, browse_outputs, api_visibility="private")
        for control in (min_confidence, max_confidence):
            control.release(handlers.browse, filters, browse_outputs, api_visibility="private")
        prev_page.click(handlers.previous_page, None, browse_outputs, api_visibility="private")
        next_page.click(handlers.next_page, None, browse_outputs, api_visibility="private")
        browse_gallery.select(handlers.select_from_gallery, None, selection_outputs, api_visibility="private")
        jump.click(handlers.select_image, [source, jump_index], selection_outputs, api_name="select_image")
        upload.upload(handlers.upload, upload, [*filters, *browse_outputs, upload_info, *selection_outputs],
                      api_name="upload")
        model.input(handlers.set_model, model, [editor, lr, max_steps, layers, *effect_outputs], api_visibility="private")
        editor.input(handlers.editor_changed, [model, editor], [lr, max_steps, layers], api_visibility="private")
        apply.click(handlers.apply_edit_progressively, [target, model, *settings_inputs], effect_outputs,
                    api_name="apply_edit_progressive")
        # /apply_edit stays one call that returns the complete report; the page's button streams (above).
        apply_api = gr.Button(visible=False)
        apply_api.click(handlers.apply_edit, [target, model, *settings_inputs], effect_outputs, api_name="apply_edit")
        undo.click(handlers.undo, None, effect_outputs, api_name="undo")
        reset.click(handlers.reset, None, effect_outputs, api_name="reset")
        history_button.click(handlers.history, None, history_json, api_name="history")
        export_weights.click(handlers.export_weights, None, export_files, api_name="export_weights")
        export_log.click(handlers.export_log, None, export_files, api_name="export_log")
        replay.upload(handlers.replay_log, replay, [model, *effect_outputs], api_name="replay_log")
        compare_button.click(handlers.compare, [target, editor, max_steps], [compare_table, compare_json],
                             api_name="compare")
        add_batch.click(handlers.add_to_batch, target, batch_info, api_name="add_to_batch")
        clear_batch.click(handlers.clear_batch, None, batch_info, api_visibility="private")
        apply_batch.click(handlers.apply_batch, [model, *settings_inputs], [*effect_outputs, batch_info],
                          api_name="apply_batch")
    return demo


def launch(lab: Lab, host: str = "127.0.0.1", port: int = 7860, block: bool = True, quiet: bool = False):
    """Build the page and serve it: local only (share=False), no server-side rendering, no analytics.
    With block=False it returns (demo, url) at once; close with demo.close()."""
    demo = build_demo(lab)
    demo.queue(default_concurrency_limit=4)
    # Gradio keeps every session's component values (plots, galleries, HTML) for up to 10,000 sessions
    # by default, closed ones included; keep as many as the lab keeps workspaces, twice over.
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, css=render.CSS + render_measure.CSS,
                footer_links=["api"], max_file_size="25mb", prevent_thread_lock=not block, quiet=quiet,
                state_session_capacity=2 * lab.registry.max_workspaces)
    return demo, f"http://{host}:{port}/"
