"""The interactive lab behind the app, without any GUI.

`Lab` is loaded once per process: the shared models, the held-out set and the fixed browse sources.
A `Workspace` is one user's corner of it: their uploads, selection, batch list, browse page and one
`EditSession` per model; `WorkspaceRegistry` hands each browser session its own workspace and bounds
how many there are and how much memory their edits hold.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from ..core.data import ImageSet, load_cifar10, load_sample, load_train_sample, resolve_data_root
from ..core.device import pick_device
from ..core.images import ImageError, decode_image
from ..experiments.nae import load_nae
from .sources import FolderSetup
from .session import (EditReport, EditSession, EditSettings, ImageRef, SettingsError, SharedModel, parse_log,
                      whole_number)

SOURCE_TEST, SOURCE_NAE, SOURCE_UPLOADS = "test", "nae", "uploads"
SORTS = ("index", "confidence-asc", "confidence-desc", "loss-desc")
MAX_UPLOADS = 200
MAX_BATCH = 32
# Session policy (WorkspaceRegistry; README "Sessions and memory").
MAX_WORKSPACES = 64
KEEP_SECONDS = 10 * 60  # a workspace used this recently is never dropped to make room
IDLE_SECONDS = 3 * 3600  # one idle this long is dropped when the next newcomer arrives
MAX_EDIT_BYTES = 1 << 30  # all workspaces' edits together (parameter dicts + held-out probabilities)


class Lab:
    """Everything shared by all users: models (by name), the held-out set, fixed browse sources."""

    def __init__(self, models: dict[str, SharedModel], sources: dict[str, ImageSet], notes: list[str] | None = None,
                 data_root: Path | None = None, replay: ImageSet | None = None):
        """`replay`: fine-tuning's training images (default: CIFAR-10's, read on first use)."""
        if not models:
            raise ValueError("the lab needs at least one model")
        self.models, self.sources, self.notes, self.data_root = models, sources, list(notes or []), data_root
        if any(len(m.heldout) != len(sources[SOURCE_TEST]) for m in models.values()):
            raise ValueError("every model must be evaluated on the test source (the held-out set)")
        self.domain = next(iter(models.values())).domain
        if any(m.domain != self.domain for m in models.values()):
            raise ValueError("every model of a lab must have the same classes and preprocessing")
        self.registry = WorkspaceRegistry(self)
        self._train: ImageSet | None = replay
        self._train_lock = threading.Lock()

    @property
    def classes(self) -> tuple[str, ...]:
        return self.domain.classes

    @classmethod
    def load(cls, checkpoints: list[tuple[str, Path]], data_root: str | Path | None = None, device: str | None = None,
             nae_path: str | Path | None = None, log=print, replicas: int = 1) -> "Lab":
        """Load the test set (held-out set and first browse source), the NAE set when it exists,
        and every checkpoint (`replicas` copies of each: edits that can run at once). A missing checkpoint
        is skipped with a note; none at all raises."""
        device = pick_device(device)
        root = resolve_data_root(data_root)
        test = load_cifar10("test", root) if root is not None else load_sample()
        sources = {SOURCE_TEST: test}
        notes = []
        if nae_path is not None and Path(nae_path).is_file():
            try:
                sources[SOURCE_NAE] = load_nae(nae_path)
            except (ValueError, OSError) as exc:
                notes.append(f"NAE set {nae_path} could not be read: {exc}")
        models = {}
        for name, path in checkpoints:
            if not Path(path).is_file():
                notes.append(f"Checkpoint {path} is missing, so the {name} model is not available: train it with "
                             "`python -m editcore train` (see the README) or pass --checkpoint.")
                continue
            started = time.perf_counter()
            models[name] = SharedModel(name, path, test, device, replicas=replicas)
            log(f"loaded {name} from {path}, held-out features for {len(test)} images in "
                f"{time.perf_counter() - started:.1f} s")
        if not models:
            raise FileNotFoundError("no model to load. " + " ".join(notes) if notes else "no checkpoint given")
        return cls(models, sources, notes, root)

    @classmethod
    def load_folder(cls, setup: FolderSetup, name: str | None = None, replicas: int = 1, log=print) -> "Lab":
        """A lab on your own model and image folder (`sources.open_folder_setup`, which has checked them)."""
        card, started = setup.checkpoint.card, time.perf_counter()
        name = name or card["arch"].split(":", 1)[1]
        model = SharedModel(name, card["source"], setup.heldout, setup.heldout.images.device, replicas=replicas,
                            checkpoint=setup.checkpoint, anchors=setup.anchors, source_flags=setup.flags)
        log(f"loaded {name} ({card['arch']}, {Path(card['source']).name}), held-out features for "
            f"{len(setup.heldout):,} images in {time.perf_counter() - started:.1f} s")
        return cls({name: model}, {SOURCE_TEST: setup.heldout}, setup.notes, None, setup.anchors)

    def source_label(self, name: str) -> str:
        if name == SOURCE_TEST:
            test = self.sources[SOURCE_TEST]
            if test.source.startswith("images:"):
                return f"Images in {test.source.split(':', 1)[1]} ({len(test):,})"
            return f"CIFAR-10 test ({len(test):,}{' sample' if len(test) < 10000 else ''})"
        if name == SOURCE_NAE:
            return f"Natural adversarial examples ({len(self.sources[SOURCE_NAE]):,})"
        return "Your uploads"

    def replay_set(self) -> ImageSet:
        """Training images for fine-tuning's replay, read on first use: the CIFAR-10 training set with a
        data root, else the shipped 2,000-image training sample (never none)."""
        with self._train_lock:
            if self._train is None:
                self._train = load_cifar10("train", self.data_root) if self.data_root is not None else load_train_sample()
            return self._train

    def short_source_label(self, name: str) -> str:
        test = "Image" if self.sources[SOURCE_TEST].source.startswith("images:") else "CIFAR-10 test"
        return {SOURCE_TEST: test, SOURCE_NAE: "NAE", SOURCE_UPLOADS: "Upload"}.get(name, name)

    def source_names(self) -> list[str]:
        return [*self.sources, SOURCE_UPLOADS]


@dataclass(frozen=True)
class BrowseQuery:
    source: str = SOURCE_TEST
    label: int | None = None  # keep images whose true class is this
    misclassified: bool = False
    min_confidence: float = 0.0  # probability of the predicted class
    max_confidence: float = 1.0
    sort: str = "index"
    page: int = 1
    page_size: int = 24


@dataclass(frozen=True)
class BrowseItem:
    ref: ImageRef
    image: torch.Tensor  # uint8 (3, S, S), the domain's size
    label: int  # -1: unknown (uploads)
    predicted: int
    confidence: float


@dataclass(frozen=True)
class BrowsePage:
    items: list[BrowseItem]
    total: int  # images matching the filters
    page: int
    n_pages: int


class Workspace:
    """One user's state. Methods that change it hold `lock`, so one user's clicks never interleave."""

    def __init__(self, lab: Lab, registry: "WorkspaceRegistry"):
        self.lab, self.registry = lab, registry  # the registry that holds it keeps the memory budget
        self.lock = threading.RLock()
        self.sessions: dict[str, EditSession] = {}
        self.model = "editable" if "editable" in lab.models else next(iter(lab.models))  # the one on screen
        self.query = BrowseQuery()  # the last browse request, re-run after every edit
        self.uploads = torch.empty(0, *lab.domain.shape, dtype=torch.uint8)
        self.upload_paths: list[str] = []  # the uploaded files, shown beside what the model sees while they last
        self.selection: ImageRef | None = None
        self.page_refs: list[ImageRef] = []
        self.batch: list[tuple[ImageRef, int]] = []
        self.last_used = time.monotonic()

    def session(self, model: str) -> EditSession:
        if model not in self.lab.models:
            raise SettingsError(f"model must be one of {', '.join(self.lab.models)}, got {model!r}")
        with self.lock:
            if model not in self.sessions:
                self.sessions[model] = EditSession(self.lab.models[model])
            return self.sessions[model]

    def use_model(self, model: str) -> EditSession:
        """Make `model` the one on screen (its session answers selections, undo, reset, history)."""
        session = self.session(model)
        self.model = model
        return session

    def source(self, name: str) -> ImageSet:
        if name == SOURCE_UPLOADS:
            n = len(self.uploads)
            return ImageSet(self.uploads, torch.full((n,), -1, dtype=torch.long), torch.arange(n), SOURCE_UPLOADS,
                            list(self.upload_paths))
        if not isinstance(name, str) or name not in self.lab.sources:
            raise SettingsError(f"source must be one of {', '.join(self.lab.source_names())}, got {name!r}")
        return self.lab.sources[name]

    def image(self, ref: ImageRef) -> tuple[torch.Tensor, int]:
        """(uint8 image (3,S,S), true label or -1) for a reference; SettingsError if out of range."""
        images = self.source(ref.source)
        if not 0 <= ref.index < len(images):
            raise SettingsError(f"index must be between 0 and {len(images) - 1} for source {ref.source!r}, got {ref.index}"
                                if len(images) else f"source {ref.source!r} has no images yet")
        return images.images[ref.index], int(images.labels[ref.index])

    def original(self, ref: ImageRef) -> str | None:
        """The picture file behind a reference: an image folder's or an upload's (None for CIFAR-10 and the NAE set)."""
        paths = self.source(ref.source).paths
        return paths[ref.index] if paths is not None and 0 <= ref.index < len(paths) else None

    def probabilities(self, model: str, source: str) -> torch.Tensor:
        """The model's current (edited) class probabilities for every image of a source."""
        session = self.session(model)
        images = self.source(source)
        if source == SOURCE_TEST:  # the test source is the held-out set: its probabilities are kept per edit
            return session.heldout_probs
        if source == SOURCE_UPLOADS:
            return session.probabilities(images.images)
        return session.source_probabilities(source, images.images)

    def browse(self, model: str | None = None, query: BrowseQuery | None = None) -> BrowsePage:
        """Filter, sort and page a source (default: the last query, with the model on screen);
        remembers the page so a gallery click maps to an image."""
        query = query or self.query
        if query.sort not in SORTS:
            raise SettingsError(f"sort must be one of {', '.join(SORTS)}, got {query.sort!r}")
        with self.lock:
            model = model or self.model
            images = self.source(query.source)
            probs = self.probabilities(model, query.source)
            labels = images.labels.cpu()
            confidence, predicted = probs.max(1)
            keep = (confidence >= query.min_confidence) & (confidence <= query.max_confidence)
            if query.label is not None:
                keep &= labels == query.label
            if query.misclassified:
                keep &= (labels >= 0) & (predicted != labels)
            rows = torch.nonzero(keep).view(-1)
            if query.sort.startswith("confidence"):
                rows = rows[confidence[rows].argsort(descending=query.sort.endswith("desc"), stable=True)]
            elif query.sort == "loss-desc":
                true_prob = probs[rows, labels[rows].clamp(min=0)]
                loss = torch.where(labels[rows] >= 0, -torch.log(true_prob.clamp(min=1e-12)), torch.full_like(true_prob, -1.0))
                rows = rows[loss.argsort(descending=True, stable=True)]
            size = max(1, int(query.page_size))
            n_pages = max(1, math.ceil(len(rows) / size))
            page = min(max(1, int(query.page)), n_pages)
            chosen = rows[(page - 1) * size : page * size].tolist()
            items = [BrowseItem(ImageRef(query.source, r), images.images[r].cpu(), int(labels[r]), int(predicted[r]),
                                float(confidence[r])) for r in chosen]
            self.page_refs = [item.ref for item in items]
            self.query = replace(query, page=page)
            return BrowsePage(items, len(rows), page, n_pages)

    def select(self, ref: ImageRef) -> tuple[torch.Tensor, int]:
        """Select an image; its index may come from a client, so anything but a whole number is refused."""
        ref = ImageRef(ref.source, whole_number(ref.index, "index"))
        with self.lock:
            image, label = self.image(ref)
            self.selection = ref
            return image, label

    def select_on_page(self, position: int) -> ImageRef:
        with self.lock:
            if not 0 <= position < len(self.page_refs):
                raise SettingsError("that image is no longer on the page; refresh the gallery")
            self.select(self.page_refs[position])
            return self.page_refs[position]

    def selected(self) -> tuple[ImageRef, torch.Tensor, int]:
        if self.selection is None:
            raise SettingsError("select an image first (click one in the gallery)")
        image, label = self.image(self.selection)
        return self.selection, image, label

    def add_uploads(self, paths: list[str | Path]) -> list[ImageRef]:
        """Decode every file; all or nothing: one unreadable file adds none and raises ImageError."""
        if not paths:
            raise ImageError("no file was uploaded")
        decoded, errors = [], []
        for path in paths:
            try:
                decoded.append(decode_image(path, self.lab.domain))
            except ImageError as exc:
                errors.append(str(exc))
        if errors:
            raise ImageError("Nothing was added. " + " ".join(errors))
        with self.lock:
            if len(self.uploads) + len(decoded) > MAX_UPLOADS:
                raise ImageError(f"a session holds at most {MAX_UPLOADS} uploads")
            start = len(self.uploads)
            self.uploads = torch.cat([self.uploads, torch.stack(decoded)])
            self.upload_paths += [str(p) for p in paths]
            return [ImageRef(SOURCE_UPLOADS, start + i) for i in range(len(decoded))]

    def edit_bytes(self) -> int:
        """Memory the edits of this workspace's sessions hold."""
        return sum(session.state_bytes() for session in list(self.sessions.values()))

    def _room_for(self, session: EditSession, settings: EditSettings, n_images: int):
        """Reserve the lab's memory for a new edit of `session` on `n_images` images while it is computed."""
        layers = settings.resolved(session.shared).layers  # bad settings are refused before anything else
        return self.registry.edit_room(self, session.edit_bytes(layers, n_images))

    def apply(self, model: str, target: int, settings: EditSettings, progress=lambda fraction, stage: None,
              on_outcome=None, on_scored=lambda score: None) -> EditReport:
        """Edit the selected image to `target` in this user's session of `model`, which is then the model on
        screen. A refused edit (SettingsError) changes nothing, not even the model on screen. `on_outcome` and
        `on_scored` hear of the edit's outcome and its held-out figures as they come (`EditSession.apply`)."""
        with self.lock:
            ref, image, _ = self.selected()
            session = self.session(model)
            with self._room_for(session, settings, 1):
                report = session.apply(image[None], [target], settings, [ref], progress, on_outcome, on_scored)
            self.model = model
            return report

    def replay(self, model: str, log: dict) -> list[EditReport]:
        """Replace the edits of this user's session of `model` by an edit log's (all or nothing, see
        `EditSession.replay`); `model` is on screen afterwards unless the log is refused."""
        with self.lock:
            session = self.session(model)
            edits = parse_log(log, session.shared)  # a bad log is refused before memory is reserved for it
            layers = edits[0]["settings"].layers if edits else session.layers
            # The replayed edits are reserved in full: the session's old ones are freed only once replaced.
            with self.registry.edit_room(self, sum(session.edit_bytes(layers, len(e["images"])) for e in edits)):
                reports = session.replay(log)
            self.model = model
            return reports

    def add_to_batch(self, target: int) -> list[tuple[ImageRef, int]]:
        with self.lock:
            ref, _, _ = self.selected()
            if not 0 <= target < len(self.lab.classes):
                raise SettingsError(f"target must be a class index 0-{len(self.lab.classes) - 1}")
            if len(self.batch) >= MAX_BATCH:
                raise SettingsError(f"a batch holds at most {MAX_BATCH} images")
            self.batch = [item for item in self.batch if item[0] != ref] + [(ref, target)]
            return list(self.batch)

    def apply_batch(self, model: str, settings: EditSettings, progress=lambda fraction, stage: None) -> EditReport:
        """One edit that gives every image of the batch its target; the batch is cleared if applied. Like
        `apply`, `model` is on screen afterwards unless the edit is refused."""
        with self.lock:
            if not self.batch:
                raise SettingsError("the batch is empty: select images and press 'Add to batch'")
            images = torch.stack([self.image(ref)[0] for ref, _ in self.batch])
            session = self.session(model)
            with self._room_for(session, settings, len(images)):
                report = session.apply(images, [t for _, t in self.batch], settings, [r for r, _ in self.batch], progress)
            self.model = model
            if report.applied:
                self.batch = []
            return report


class WorkspaceRegistry:
    """Workspaces by browser-session key, bounded in number and in the memory their edits hold.

    The policy: a workspace used in the last `keep_seconds` is never dropped by the registry (closing its
    tab drops it). One idle for over `idle_seconds` is dropped when the next newcomer arrives; one idle for
    less is dropped, least recently used first, only to make room. When no room can be made, the newcomer
    (or the new edit) is refused with a message saying so: arrival order never drops anyone's recent work.
    Edits reserve their memory (`edit_room`) before they are computed, so the edits of all workspaces
    together never hold more than `max_edit_bytes`."""

    def __init__(self, lab: Lab, max_workspaces: int = MAX_WORKSPACES, keep_seconds: float = KEEP_SECONDS,
                 idle_seconds: float = IDLE_SECONDS, max_edit_bytes: int = MAX_EDIT_BYTES, clock=time.monotonic):
        self.lab, self.max_workspaces, self.keep_seconds, self.idle_seconds = lab, max_workspaces, keep_seconds, idle_seconds
        self.max_edit_bytes, self.clock = max_edit_bytes, clock
        self._workspaces: dict[str, Workspace] = {}
        self._reserved = 0  # bytes reserved by edits being computed
        self._lock = threading.Lock()

    def get(self, key: str) -> Workspace:
        """The workspace of `key` (created on first use); SettingsError when the lab is full."""
        with self._lock:
            now = self.clock()
            workspace = self._workspaces.get(key)
            if workspace is None:
                self._drop([k for k, w in self._workspaces.items() if now - w.last_used > self.idle_seconds])
                if len(self._workspaces) >= self.max_workspaces and not self._drop_least_recent(now):
                    raise SettingsError(
                        f"EditLab is full: {len(self._workspaces)} sessions (the limit) were all used in the last "
                        f"{self.keep_seconds / 60:g} minutes. Please try again in a few minutes.")
                workspace = self._workspaces[key] = Workspace(self.lab, self)
            workspace.last_used = now
            return workspace

    def drop(self, key: str) -> None:
        with self._lock:
            self._drop([key])

    def __len__(self) -> int:
        return len(self._workspaces)

    def edit_bytes(self) -> int:
        """Memory held by the edits of every workspace, plus what edits being computed have reserved."""
        return self._reserved + sum(w.edit_bytes() for w in list(self._workspaces.values()))

    @contextlib.contextmanager
    def edit_room(self, workspace: Workspace, n_bytes: int):
        """Reserve `n_bytes` for new edit states while they are computed, dropping workspaces idle for
        over `keep_seconds` (least recently used first) when the budget needs it; SettingsError when it
        cannot be had."""
        with self._lock:
            while self.edit_bytes() + n_bytes > self.max_edit_bytes:
                if not self._drop_least_recent(self.clock(), spare=workspace):
                    raise SettingsError(
                        f"The server's memory for edits is full ({self.edit_bytes() / 2**20:.0f} of "
                        f"{self.max_edit_bytes / 2**20:.0f} MiB, held by sessions used in the last "
                        f"{self.keep_seconds / 60:g} minutes). Undo or reset edits you no longer need, or try again later.")
            self._reserved += n_bytes
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= n_bytes
            release_memory()  # an edit's transient tensors were freed just now (~2 ms; docs/RELIABILITY.md)

    def _drop_least_recent(self, now: float, spare: Workspace | None = None) -> bool:
        """Drop the least recently used workspace idle for over `keep_seconds`; False when there is none."""
        idle = [k for k, w in self._workspaces.items() if now - w.last_used > self.keep_seconds and w is not spare]
        if not idle:
            return False
        self._drop([min(idle, key=lambda k: self._workspaces[k].last_used)])
        return True

    def _drop(self, keys: list[str]) -> None:
        if any([self._workspaces.pop(key, None) is not None for key in keys]):
            release_memory()  # their tensors were freed just now


def release_memory() -> None:
    """Hand freed heap memory back to the system. glibc keeps what freed tensors leave in its arenas
    (per thread) and returns it only on malloc_trim; without it, RSS stays at its peak after sessions
    leave (docs/RELIABILITY.md). A no-op where glibc is absent."""
    if _libc is not None:
        _libc.malloc_trim(0)


def limit_allocator_retention() -> None:
    """Bound what glibc keeps of freed tensors: at most two heap arenas and a fixed mmap threshold of
    32 MiB (its defaults: eight arenas per core and a threshold that moves). With the defaults a server
    whose handlers run on many threads kept ~450 MB of freed memory after sessions left; with these and
    `release_memory` when sessions are dropped, RSS returns to where it started. A 128 KiB threshold did
    that too but cost ~55% more CPU per edit in page faults (docs/RELIABILITY.md, Memory). The trim
    threshold is raised with it: a fixed mmap threshold leaves glibc's at 128 KiB, so a worker thread's
    arena gave its top back after every freed activation and faulted it in again on the next (held-out
    scoring on a handler's thread: 52,000 page faults and ~40% more wall time per call); the explicit
    trims return that memory instead. Call it at start, before threads allocate; a no-op where glibc is
    absent."""
    if _libc is not None:
        _libc.mallopt(M_ARENA_MAX, 2)
        _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        _libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 256 * 2**20  # well above a re-evaluation batch's transient tensors (1,000 rows: 16 MB an activation)
