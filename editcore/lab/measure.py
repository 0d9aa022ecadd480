"""The paper's measurement, N seeded edits per model and editor, as the CLI and the app run it.

`python -m editcore evaluate-edits` and the app's Measure tab build their edits with the same functions
(`protocol_sets`, `protocol_editor`) and run the same loop (`metrics.evaluate_edits`), so the tab's numbers
are the command's. On the app's server `measure` lends a run one replica of a model per edit
(`SharedModel.replica`), so other visitors' edits run between its edits; `ProtocolRuns` allows one run per
session and stops it between two edits when asked; `ResultCache` keeps finished rows per (checkpoint
sha256, held-out set, protocol, N, seed, editor settings), starting from the shipped defaults
(`SHIPPED_RESULTS`, written by `python -m editcore measure --out ...`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..core.augment_views import DEFAULT_VIEWS_SEED
from ..core.data import ASSETS, ImageSet
from ..core.editors import EDITORS, Editor, create_editor
from ..experiments.fixers import EditorFixer
from ..core.locality import DEFAULT_EDITOR
from ..core.heldout import EVAL_BATCH, HeldOutEvaluator, full_logits
from ..experiments.metrics import evaluate_edits
from ..experiments.nae import heldout_part
from ..experiments.nae import HELDOUT as NAE_HELDOUT
from .session import SettingsError, SharedModel, lesson_editors, whole_number

# --protocol of evaluate-edits -> draw_edits' target kind.
PROTOCOL_TARGETS = {"other": "other", "corrections": "corrections", "random": "random", "nae": "true"}
PROTOCOL_LABELS = {
    "other": "R: random targets, each another class than the true one",
    "corrections": "C: corrections, images the model gets wrong, to their true label",
    "nae": "NAE: natural adversarial examples, to their true label",
    "random": "random targets, the true class included (the paper code's)",
}
MEASURE_PROTOCOLS = ("other", "corrections", "nae")  # what the Measure tab offers
MIN_EDITS, MAX_EDITS = 10, 500  # per model and editor; a run of the tab does at most 4 models x 6 editors x 500
DEFAULT_N_EDITS = 100
SHIPPED_RESULTS = ASSETS / "measure_defaults.json"  # the embedded sample's; measure_defaults_*.json: other held-out sets
RESULTS_FORMAT, RESULTS_VERSION = "editlab-measurement", 1
MAX_CACHED_ROWS = 256  # a row keeps N per-edit records (~100 bytes each)
# After each edit a run waits this long before it takes a replica again, so that a visitor whose edit
# was waiting for that replica gets it first (the waiting thread is woken, but must run to take it).
COURTESY_SECONDS = 0.005
# When an edit had to wait for its replica, another visitor is using the model: the run then also steps aside
# for as long as it waited (at most this long), so that the visitor's next steps (its re-evaluation, top-5,
# page) find the replica and the cores free instead of waiting behind the run's next edit.
STEP_ASIDE_MAX_SECONDS = 2.0


class MeasureCancelled(Exception):
    """A run stopped on request; the rows finished before it are kept in the cache."""


@dataclass(frozen=True)
class ProtocolSets:
    edit_set: ImageSet  # the images the edits are drawn from
    heldout_set: ImageSet  # the images drawdown is scored on
    targets: str  # draw_edits' kind
    overlaps: bool  # edits are drawn from the held-out images themselves (each edited image is 1 of M)


def protocol_sets(protocol: str, test_set: ImageSet, heldout_size: int = 0, nae_set: ImageSet | None = None,
                  say: Callable[[str], None] = lambda message: None) -> ProtocolSets:
    """The edit and held-out sets of a protocol, as evaluate-edits builds them.

    R / C / random: the held-out set is the test set, or its first `heldout_size` images, and edits come from
    the test images after those (with the whole test set held out, as on the embedded sample, from the
    held-out images themselves). NAE: edits are the NAE images, drawdown is scored on the test images of
    `nae.HELDOUT` that are not NAE images (first `heldout_size` of them)."""
    if protocol not in PROTOCOL_TARGETS:
        raise SettingsError(f"protocol must be one of {', '.join(PROTOCOL_TARGETS)}, got {protocol!r}")
    if protocol == "nae":
        if nae_set is None:
            raise SettingsError("the NAE protocol needs the NAE set (assets/cifar10_nae.npz or --nae)")
        edit_set, test_set = nae_set, heldout_part(test_set)
        if test_set.source != "cifar10-test":
            say(f"NAE protocol without a data root: drawdown on the embedded sample (test 0-999, {len(test_set)} "
                f"images), not on the full held-out part (test {NAE_HELDOUT[0]}-{NAE_HELDOUT[1] - 1})")
        overlap = torch.isin(test_set.indices, nae_set.indices.to(test_set.indices.device))
        if bool(overlap.any()):
            say(f"{int(overlap.sum())} held-out images are also in the NAE set: left out of the held-out part")
            test_set = test_set.subset(torch.nonzero(~overlap).view(-1))
    heldout = test_set if not heldout_size else test_set.subset(torch.arange(min(heldout_size, len(test_set))))
    if protocol != "nae":
        edit_set = test_set.subset(torch.arange(len(heldout), len(test_set))) if len(heldout) < len(test_set) else test_set
    return ProtocolSets(edit_set, heldout, PROTOCOL_TARGETS[protocol], protocol != "nae" and edit_set is test_set)


def protocol_editor(name: str, learned: Editor | None, lr: float | None = None) -> tuple[Editor, bool]:
    """(editor, whether it is the checkpoint's learned one): the editor editable training learned when `name`
    is that editor and no `lr` is given, as evaluate-edits does; else `name` at `lr` (None: its default)."""
    if name not in EDITORS:
        raise SettingsError(f"editor must be one of {', '.join(EDITORS)}, got {name!r}")
    if learned is not None and learned.name == name and lr is None:
        return learned, True
    return create_editor(name, lr=lr), False


@dataclass(frozen=True)
class MeasureSettings:
    """One run of the Measure tab. models () = every loaded model."""

    protocol: str = "other"
    n_edits: int = DEFAULT_N_EDITS
    seed: int = 0
    editors: tuple[str, ...] = (DEFAULT_EDITOR,)  # the page and the CLI ask for lesson_editors(models)
    models: tuple[str, ...] = ()

    def validated(self, models: list[str], bounded: bool = True) -> "MeasureSettings":
        """Checked settings (SettingsError naming what to change), models filled in. `bounded`: N at most
        MAX_EDITS (a server shared by a class; the command line may ask for more)."""
        if self.protocol not in MEASURE_PROTOCOLS:
            raise SettingsError(f"protocol must be one of {', '.join(MEASURE_PROTOCOLS)}, got {self.protocol!r}")
        n_edits = whole_number(self.n_edits, "N (edits per model and editor)")
        if not MIN_EDITS <= n_edits <= (MAX_EDITS if bounded else n_edits):
            raise SettingsError(f"N must be from {MIN_EDITS} to {MAX_EDITS} edits per model and editor, got {n_edits}")
        seed = whole_number(self.seed, "seed")
        if not 0 <= seed < 2**31:
            raise SettingsError(f"seed must be from 0 to {2**31 - 1}, got {seed}")
        editors = tuple(dict.fromkeys(self.editors or ()))
        if not editors:
            raise SettingsError("choose at least one editor")
        unknown = [e for e in editors if e not in EDITORS]
        if unknown:
            raise SettingsError(f"editors must be among {', '.join(EDITORS)}, got {', '.join(map(str, unknown))}")
        chosen = tuple(dict.fromkeys(self.models or models))
        unknown = [m for m in chosen if m not in models]
        if unknown:
            raise SettingsError(f"models must be among {', '.join(models)}, got {', '.join(map(str, unknown))}")
        return MeasureSettings(self.protocol, n_edits, seed, editors, chosen)


def set_name(images: ImageSet) -> str:
    """A held-out or edit set named by its source and size (what the cache keys on)."""
    return f"{images.source}:{len(images)}"


@dataclass
class MeasureRow:
    """One model x editor of a run: evaluate-edits' summary, its per-edit records and what made them."""

    model: str
    checkpoint: str  # file name
    sha256: str
    editor: str
    editor_hparams: dict
    editor_learned: bool
    layers: str
    max_steps: int
    protocol: str
    n_edits: int  # asked for; summary["n_edits"] is how many were made (C: at most the model's mistakes)
    seed: int
    heldout: str  # set_name of the held-out set
    edit_source: str  # set_name of the edit set
    summary: dict
    records: list[dict]
    command: str  # the evaluate-edits command that gives the same numbers
    from_cache: bool = field(default=False, compare=False)

    @property
    def key(self) -> str:
        return row_key(self.sha256, self.heldout, self.edit_source, self.protocol, self.n_edits, self.seed,
                       self.editor, self.editor_hparams, self.layers, self.max_steps, self.summary.get("views_seed"))

    def drawdowns(self) -> list[float]:
        """Each edit's drawdown: held-out error after it minus the unedited model's."""
        return [r["error_after"] - self.summary["test_error"] for r in self.records]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "from_cache"}

    @classmethod
    def from_dict(cls, data: dict) -> "MeasureRow":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k != "from_cache"})


def row_key(sha256: str, heldout: str, edit_source: str, protocol: str, n_edits: int, seed: int, editor: str,
            editor_hparams: dict, layers: str, max_steps: int, views_seed) -> str:
    return json.dumps([sha256, heldout, edit_source, protocol, n_edits, seed, editor,
                       {k: round(float(v), 9) for k, v in sorted(editor_hparams.items())}, layers, max_steps, views_seed])


class ResultCache:
    """Finished rows by key, the least recently used dropped beyond `most`; the shipped rows stay."""

    SHIPPED = sorted(ASSETS.glob("measure_defaults*.json"))

    def __init__(self, most: int = MAX_CACHED_ROWS):
        self.most = most
        self._rows: OrderedDict[str, MeasureRow] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()

    def get(self, key: str) -> MeasureRow | None:
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
            return row

    def put(self, row: MeasureRow, pinned: bool = False) -> None:
        with self._lock:
            self._rows[row.key] = replace(row, from_cache=False)
            self._rows.move_to_end(row.key)
            if pinned:
                self._pinned.add(row.key)
            for key in [k for k in self._rows if k not in self._pinned][: max(0, len(self._rows) - self.most)]:
                del self._rows[key]

    def load(self, path: str | Path) -> int:
        """Add the rows of a results file (`results_json`); returns how many. A missing file adds none."""
        path = Path(path)
        if not path.is_file():
            return 0
        data = json.loads(path.read_text())
        if data.get("format") != RESULTS_FORMAT or data.get("version") != RESULTS_VERSION:
            raise ValueError(f"{path} is not an EditLab measurement (format {RESULTS_FORMAT} v{RESULTS_VERSION})")
        rows = [MeasureRow.from_dict(item) for item in data["rows"]]
        for row in rows:
            self.put(row, pinned=True)
        return len(rows)

    def __len__(self) -> int:
        return len(self._rows)


class ProtocolRuns:
    """At most one protocol run per session; a run is asked to stop through `cancel`."""

    def __init__(self):
        self._runs: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def start(self, session: str) -> Iterator[threading.Event]:
        """Register a run for `session` (SettingsError if one is running); yields its stop flag."""
        with self._lock:
            if session in self._runs:
                raise SettingsError("a measurement is already running in this session: wait for it or cancel it")
            stop = self._runs[session] = threading.Event()
        try:
            yield stop
        finally:
            with self._lock:
                self._runs.pop(session, None)

    def cancel(self, session: str) -> bool:
        """Ask the session's run to stop after its current edit; False when none is running."""
        with self._lock:
            stop = self._runs.get(session)
        if stop is None:
            return False
        stop.set()
        return True

    def running(self, session: str) -> bool:
        with self._lock:
            return session in self._runs


def display_path(path: Path) -> str:
    """A checkpoint path for a command a visitor may copy: relative to the working directory when inside it,
    else the file name alone (the server's folders are not the visitor's business)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return Path(path).name


def evaluate_edits_command(checkpoint: str, editor: str, protocol: str, n_edits: int, seed: int,
                           data_root: bool, source_flags: list[str] | None = None) -> str:
    """The evaluate-edits command of one row; `source_flags` (your own model and images) stand for --checkpoint."""
    source = shlex.join(source_flags) if source_flags else f"--checkpoint {checkpoint}"
    parts = ["python -m editcore evaluate-edits", source, f"--editor {editor}",
             f"--protocol {protocol}", f"--n-edits {n_edits}", f"--seed {seed}"]
    if data_root:
        parts.append("--data-root $EDITLAB_DATA")
    return " ".join(parts)


def measure_command(models: dict[str, SharedModel], settings: MeasureSettings, data_root: bool) -> str:
    """The `python -m editcore measure` command that makes the same rows; for your own model (which `measure`
    does not open), the evaluate-edits command of each row."""
    if any(models[m].source_flags for m in settings.models):
        return "\n".join(evaluate_edits_command(display_path(models[m].path), e, settings.protocol, settings.n_edits,
                                                settings.seed, data_root, models[m].source_flags)
                         for m in settings.models for e in settings.editors)
    parts = ["python -m editcore measure", *[f"--checkpoint {m}={display_path(models[m].path)}" for m in settings.models],
             *[f"--editor {e}" for e in settings.editors], f"--protocol {settings.protocol}",
             f"--n-edits {settings.n_edits}", f"--seed {settings.seed}"]
    if data_root:
        parts.append("--data-root $EDITLAB_DATA")
    return " ".join(parts)


class _Evaluators:
    """Held-out evaluators for sets other than a model's own held-out set (the NAE protocol's part of the
    test set), built once per model, layers and set."""

    def __init__(self):
        self._built: dict[tuple[int, str, str], HeldOutEvaluator] = {}
        self._lock = threading.Lock()

    def get(self, shared: SharedModel, layers: str, heldout: ImageSet) -> HeldOutEvaluator:
        if heldout is shared.heldout or (set_name(heldout) == set_name(shared.heldout)
                                         and torch.equal(heldout.indices.cpu(), shared.heldout.indices.cpu())):
            return shared.evaluator(layers)
        key = (id(shared), layers, set_name(heldout))
        with self._lock:
            if key not in self._built:
                with shared.replica(shared.primary):
                    self._built[key] = HeldOutEvaluator(shared.editable(layers), heldout.images.to(shared.device),
                                                        heldout.labels.to(shared.device), EVAL_BATCH,
                                                        shared.mixed_precision)
            return self._built[key]


_EVALUATORS = _Evaluators()


@dataclass
class _Plan:
    shared: SharedModel
    editor: Editor
    learned: bool
    layers: str
    key: str
    predictions: torch.Tensor | None  # corrections: the model's classes on the edit set
    n_edits: int  # edits this row will make


def _plan(shared: SharedModel, name: str, settings: MeasureSettings, sets: ProtocolSets) -> _Plan:
    editor, learned = protocol_editor(name, shared.learned_editor)
    editor = editor.to(shared.device)
    layers = shared.layers_for(name)
    key = row_key(shared.sha256, set_name(sets.heldout_set), set_name(sets.edit_set), settings.protocol,
                  settings.n_edits, settings.seed, name, editor.hyperparameters(), layers, editor.default_max_steps,
                  DEFAULT_VIEWS_SEED)
    return _Plan(shared, editor, learned, layers, key, None, settings.n_edits)


def prepare_editors(models: dict[str, SharedModel], editors: tuple[str, ...] | None = None) -> None:
    """Compute once what an editor needs per model before its first edit (the local editor's anchor subspace and
    guarded rows, a few seconds of CPU), so that a protocol run's first edits, and the first visitor's, do not wait for it.
    The app's server calls it in the background at start. editors None: the page's, `lesson_editors`."""
    editors = editors or lesson_editors(models)
    for shared in models.values():
        for name in editors:
            editor = create_editor(name)
            if hasattr(editor, "subspace"):
                with shared.replica() as replica:
                    editable = shared.editable(shared.layers_for(name), replica)
                    editor.to(shared.device).subspace(editable)
                    if editor.guard:
                        editor.guard_rows(editable)


def cached_rows(models: dict[str, SharedModel], settings: MeasureSettings, test_set: ImageSet,
                nae_set: ImageSet | None, cache: ResultCache) -> list[MeasureRow] | None:
    """The rows `measure` would return if every one of them is in `cache` (nothing is run), else None."""
    settings = settings.validated(list(models))
    sets = protocol_sets(settings.protocol, test_set, 0, nae_set)
    rows = [cache.get(_plan(models[m], e, settings, sets).key) for m in settings.models for e in settings.editors]
    return None if any(row is None for row in rows) else [replace(row, from_cache=True) for row in rows]


def measure(models: dict[str, SharedModel], settings: MeasureSettings, test_set: ImageSet,
            nae_set: ImageSet | None = None, cache: ResultCache | None = None, data_root: bool = False,
            progress: Callable[[int, int, str], None] = lambda done, total, stage: None,
            stop: threading.Event | None = None, courtesy_seconds: float = COURTESY_SECONDS,
            bounded: bool = True) -> list[MeasureRow]:
    """Run the protocol for every chosen model x editor (cached rows are not run again), in that order.

    Each edit holds one replica of its model and gives it back before the next (`SharedModel.replica`), so
    other users' edits run between them; after an edit that had to wait for its replica, the run steps aside
    as long again (STEP_ASIDE_MAX_SECONDS at most). `progress(done, total, stage)` after each edit; when `stop` is set,
    the run ends after the current edit with MeasureCancelled (finished rows stay in `cache`)."""
    settings = settings.validated(list(models), bounded)
    sets = protocol_sets(settings.protocol, test_set, 0, nae_set)
    plans = [_plan(models[m], e, settings, sets) for m in settings.models for e in settings.editors]
    cached = {plan.key: cache.get(plan.key) if cache is not None else None for plan in plans}
    pending = [plan for plan in plans if cached[plan.key] is None]
    if settings.protocol == "corrections":
        for plan in pending:  # each model corrects its own mistakes: at most as many edits as it makes
            with plan.shared.replica() as replica:
                plan.predictions = full_logits(replica.model, sets.edit_set.images.to(plan.shared.device)).argmax(1)
            plan.n_edits = min(settings.n_edits, int((plan.predictions.cpu() != sets.edit_set.labels.cpu()).sum()))
    total, done = sum(plan.n_edits for plan in pending), 0
    if total:
        progress(0, total, "starting")
    computed: dict[str, MeasureRow] = {}
    for plan in pending:
        shared, name = plan.shared, plan.editor.name
        stage = f"{shared.name} model, {name} editor"
        if hasattr(plan.editor, "subspace"):  # the local editor's anchor subspace: computed once per model
            progress(done, total, f"{stage}: preparing the editor's anchor subspace (once per model)")
            with shared.replica() as replica:
                plan.editor.subspace(shared.editable(plan.layers, replica))
        evaluator = _EVALUATORS.get(shared, plan.layers, sets.heldout_set)
        first_done = done

        @contextlib.contextmanager
        def one_replica(plan=plan, evaluator=evaluator):
            asked = time.perf_counter()
            with plan.shared.replica() as replica:
                waited = time.perf_counter() - asked
                editable = plan.shared.editable(plan.layers, replica)
                yield EditorFixer(editable, plan.editor, plan.editor.default_max_steps), evaluator.on(editable)
            time.sleep(courtesy_seconds + min(waited, STEP_ASIDE_MAX_SECONDS))

        def after_edit(i, n, stage=stage, first_done=first_done):
            nonlocal done
            done = first_done + i
            progress(done, total, f"{stage}: edit {i} of {n}")
            if stop is not None and stop.is_set():
                raise MeasureCancelled(f"cancelled after {done} of {total} edits")

        editable = shared.editable(plan.layers)
        summary, records = evaluate_edits(editable, plan.editor, evaluator, sets.edit_set, n_edits=settings.n_edits,
                                          seed=settings.seed, max_steps=plan.editor.default_max_steps,
                                          targets=sets.targets, progress=after_edit, predictions=plan.predictions,
                                          hold=one_replica)
        summary.update(checkpoint=shared.path.name, editor=name, editor_hparams=plan.editor.hyperparameters(),
                       editor_learned=plan.learned, protocol=settings.protocol, layers=plan.layers,
                       device=str(shared.device), data=test_set.source, edit_source_overlaps_heldout=sets.overlaps,
                       threads=torch.get_num_threads())
        row = MeasureRow(shared.name, shared.path.name, shared.sha256, name, plan.editor.hyperparameters(), plan.learned,
                         plan.layers, plan.editor.default_max_steps, settings.protocol, settings.n_edits, settings.seed,
                         set_name(sets.heldout_set), set_name(sets.edit_set), summary,
                         [asdict(r) for r in records],
                         evaluate_edits_command(display_path(shared.path), name, settings.protocol, settings.n_edits,
                                                settings.seed, data_root, shared.source_flags))
        computed[plan.key] = row
        if cache is not None:
            cache.put(row)
    return [computed[plan.key] if plan.key in computed else replace(cached[plan.key], from_cache=True) for plan in plans]


SUMMARY_COLUMNS = ("model", "editor", "lr", "learned", "layers", "max_steps", "protocol", "n_edits", "seed", "n_heldout",
                   "test_error", "drawdown", "drawdown_ci95_low", "drawdown_ci95_high", "drawdown_middle95_low",
                   "drawdown_middle95_high", "success_rate", "mean_steps", "generalization", "mean_edit_seconds", "command")
EDIT_COLUMNS = ("model", "editor", "edit", "image", "target", "success", "steps", "seconds", "error_after", "drawdown",
                "generalization")


def summary_csv(rows: list[MeasureRow]) -> str:
    """One line per model x editor."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(SUMMARY_COLUMNS)
    for row in rows:
        s = row.summary
        writer.writerow([row.model, row.editor, row.editor_hparams.get("lr"), row.editor_learned, row.layers,
                         row.max_steps, row.protocol, s["n_edits"], row.seed, s["n_heldout"], s["test_error"],
                         s["drawdown"], *s["drawdown_ci95"], *s["drawdown_middle95"], s["success_rate"], s["mean_steps"],
                         s.get("generalization"), s["mean_edit_seconds"], row.command])
    return out.getvalue()


def edits_csv(rows: list[MeasureRow]) -> str:
    """One line per edit: the spread behind each mean."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(EDIT_COLUMNS)
    for row in rows:
        for number, (record, drawdown) in enumerate(zip(row.records, row.drawdowns()), 1):
            writer.writerow([row.model, row.editor, number, record["index"], record["target"], record["success"],
                             record["steps"], record["seconds"], record["error_after"], drawdown,
                             record["generalization"]])
    return out.getvalue()


def results_json(rows: list[MeasureRow], command: str, commit: str | None = None, **extra) -> dict:
    """The rows as a results file: what `ResultCache.load` reads and the tab's JSON download. `commit`: the code's
    git commit when the run started (default: now)."""
    from ..core.checkpoint import git_commit

    return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "command": command, "git_commit": commit or git_commit(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
            "rows": [row.to_dict() for row in rows]}
