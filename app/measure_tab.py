"""The Measure tab: the paper's measurement (N seeded edits per model and editor, editcore.lab.measure) run on the
server with a progress bar, and what editable training did (the models' training histories from their cards).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import gradio as gr

from editcore import (MAX_EDITS, MEASURE_PROTOCOLS, MIN_EDITS, PROTOCOL_LABELS, SOURCE_NAE, SOURCE_TEST,
                      Lab, MeasureCancelled, MeasureRow, MeasureSettings, ProtocolRuns, ResultCache, SettingsError,
                      cached_rows, edits_csv, lesson_editors, measure, measure_command, results_json, summary_csv)

from . import render_measure

INTRO = (
    "**The paper's measurement.** One edit says little: the paper measures an editor by many seeded edits, each "
    "from the unedited model, and reports the test error, the **drawdown** (how much held-out error one edit "
    "adds), how often the edit succeeds and how many steps it takes, for a baseline-trained and an "
    "editable-trained model. Run it here for several editors at once; the dots below show every edit, so you see "
    "the spread, not just the mean. Other visitors keep editing while it runs (it borrows a model between two of "
    "its edits). One run per browser tab; N is at most {max_edits} per model and editor."
)


def _session_key(request) -> str:
    return getattr(request, "session_hash", None) or "default"


class MeasureHandlers:
    """The tab's events as plain methods (tests call them with a stand-in request)."""

    def __init__(self, lab: Lab, export_path: Callable[[str, str], Path], editor_labels: dict[str, str],
                 shipped: list[Path] | None = None):
        self.lab, self.export_path, self.editor_labels = lab, export_path, editor_labels
        self.cache = ResultCache()
        self.runs = ProtocolRuns()
        self.notes: list[str] = []
        for path in ResultCache.SHIPPED if shipped is None else shipped:
            try:
                self.cache.load(path)
            except (ValueError, KeyError, TypeError, OSError) as exc:  # a damaged file must not stop the app
                self.notes.append(f"The stored measurement {path.name} could not be read ({exc}); its settings are "
                                  "measured again when asked for.")

    @property
    def data_root(self) -> bool:
        return self.lab.data_root is not None

    def _sets(self):
        return self.lab.sources[SOURCE_TEST], self.lab.sources.get(SOURCE_NAE)

    def outputs(self, rows: list[MeasureRow], settings: MeasureSettings, status: str):
        """(results JSON, status, table, plot, downloads, command) for the page and the /run_protocol API."""
        if not rows:
            return None, status, render_measure.measure_table([], self.editor_labels), "", gr.update(visible=False), ""
        command = measure_command(self.lab.models, settings, self.data_root)
        results = results_json(rows, command)
        stem = f"editlab-measure-{settings.protocol}-n{settings.n_edits}-seed{settings.seed}"
        files = []
        for suffix, text in (("-summary.csv", summary_csv(rows)), ("-edits.csv", edits_csv(rows)),
                             (".json", json.dumps(results, indent=1) + "\n")):
            path = self.export_path(stem + suffix.rsplit(".", 1)[0], "." + suffix.rsplit(".", 1)[1])
            path.write_text(text)
            files.append(str(path))
        api = {"command": command, "rows": [{**{k: v for k, v in row.to_dict().items() if k != "records"},
                                             "drawdowns": row.drawdowns(), "from_cache": row.from_cache} for row in rows]}
        command_md = ("The same numbers from the command line (each row is also one `evaluate-edits` run, named in "
                      f"the downloads):\n```bash\n{command}\n```")
        return (api, status, render_measure.measure_table(rows, self.editor_labels),
                render_measure.drawdown_strip(rows, self.editor_labels), gr.update(value=files, visible=True), command_md)

    def initial(self):
        """What the tab shows when it opens: the stored results of the default settings, when there are any."""
        settings = MeasureSettings(editors=lesson_editors(self.lab.models)).validated(list(self.lab.models))
        test, nae = self._sets()
        rows = cached_rows(self.lab.models, settings, test, nae, self.cache) or []
        status = ("Stored results of the default settings, computed once with the command below; change the settings "
                  "and press **Run the measurement** to measure again." if rows else
                  "No stored results for these models: press **Run the measurement**.")
        return self.outputs(rows, settings, status)

    def run_protocol(self, protocol: str, n_edits: float, seed: float, editors: list[str], models: list[str],
                     request: gr.Request, progress=gr.Progress()):
        """API /run_protocol: N seeded edits per model x editor (protocol 'other' = R, 'corrections' = C, 'nae');
        returns the results (JSON) first, then the status, table, plot, downloads and the command."""
        try:
            settings = MeasureSettings(protocol, n_edits, seed, tuple(editors or ()), tuple(models or ()))
            settings = settings.validated(list(self.lab.models))
            test, nae = self._sets()

            def report(done: int, total: int, stage: str) -> None:
                if total:
                    progress((done, total), desc=stage, unit="edits")

            with self.runs.start(_session_key(request)) as stop:
                rows = measure(self.lab.models, settings, test, nae, self.cache, self.data_root, report, stop)
        except MeasureCancelled as exc:
            return (gr.skip(), f"**Cancelled** ({exc}). Finished model × editor rows are kept: run again to continue.",
                    gr.skip(), gr.skip(), gr.skip(), gr.skip())
        except SettingsError as exc:
            raise gr.Error(str(exc), title="Not possible") from None
        fresh = sum(not row.from_cache for row in rows)
        status = (f"Done: {len(rows)} model × editor row(s), {fresh} measured now"
                  + (f", {len(rows) - fresh} from stored results" if fresh < len(rows) else "") + ".")
        return self.outputs(rows, settings, status)

    def cancel(self, request: gr.Request) -> str:
        if self.runs.cancel(_session_key(request)):
            return "Cancelling: the run stops after its current edit."
        return "No measurement is running in this tab."

    def unload(self, request: gr.Request):
        self.runs.cancel(_session_key(request))


def build_measure_tab(lab: Lab, handlers: MeasureHandlers):
    """The tab's layout and wiring (call inside `gr.Tabs()`)."""
    initial = handlers.initial()
    nae_ready = SOURCE_NAE in lab.sources
    protocols = [(PROTOCOL_LABELS[p], p) for p in MEASURE_PROTOCOLS if p != "nae" or nae_ready]
    with gr.Tab("Measure: many edits", id="measure"):
        gr.Markdown(INTRO.format(max_edits=MAX_EDITS))
        for note in handlers.notes:
            gr.Markdown(f"⚠️ {note}", elem_classes="notes")
        with gr.Row():
            protocol = gr.Radio(protocols, value="other", label="Protocol", elem_id="measure-protocol", scale=3)
            with gr.Column(scale=2):
                n_edits = gr.Slider(MIN_EDITS, MAX_EDITS, value=MeasureSettings.n_edits, step=10,
                                    label="N: edits per model and editor", elem_id="measure-n")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="measure-seed", minimum=0)
        with gr.Row():
            editors = gr.CheckboxGroup([(label, name) for name, label in handlers.editor_labels.items()],
                                       value=list(lesson_editors(lab.models)), label="Editors", elem_id="measure-editors", scale=3)
            models = gr.CheckboxGroup([(lab.models[m].description, m) for m in lab.models], value=list(lab.models),
                                      label="Models", elem_id="measure-models", scale=2)
        with gr.Row():
            run = gr.Button("Run the measurement", variant="primary", elem_id="measure-run")
            cancel = gr.Button("Cancel", elem_id="measure-cancel")
        status = gr.Markdown(initial[1], elem_id="measure-status")
        table = gr.HTML(initial[2], elem_id="measure-table")
        plot = gr.HTML(initial[3], elem_id="measure-plot")
        files = gr.File(initial[4]["value"] if initial[0] else None, label="Downloads: summary CSV, per-edit CSV, JSON",
                        file_count="multiple", interactive=False, visible=bool(initial[0]), elem_id="measure-files")
        command = gr.Markdown(initial[5], elem_id="measure-command")
        with gr.Accordion("Results as JSON (the /run_protocol API)", open=False):
            results = gr.JSON(initial[0])
        gr.Markdown("### What editable training did")
        gr.HTML(render_measure.training_history({name: shared.card for name, shared in lab.models.items()},
                                                {name: shared.path.name for name, shared in lab.models.items()}),
                elem_id="training-history")
    run.click(handlers.run_protocol, [protocol, n_edits, seed, editors, models],
              [results, status, table, plot, files, command], api_name="run_protocol",
              concurrency_limit=1, concurrency_id="measure")
    cancel.click(handlers.cancel, None, status, api_name="cancel_protocol")
