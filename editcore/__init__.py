"""editcore: Editable Neural Networks (Sinitsin et al., ICLR 2020) as a GUI-free library."""
from types import ModuleType as _ModuleType

# core: the model, its edits and what they are measured on
from .core.augment_views import augmented_views, generalization, view_families, view_specs
from .core.checkpoint import Checkpoint, load_checkpoint, read_card, save_checkpoint
from .core.data import (CLASSES, SHIPPED_MODELS, DataError, ImageSet, augment, load_cifar10, load_sample,
                        load_train_sample, normalize, resolve_data_root)
from .core.device import DEFAULT_THREADS, arithmetic, arithmetic_differences, pick_device
from .core.domain import CIFAR10, Domain
from .core.edit import EditableModel, EditResult, edit, edit_loss, eval_mode, logit_margins
from .core.editors import EDITORS, Editor, create_editor, register_editor
from .core.heldout import HeldOutEvaluator, full_logits
from .core.images import ImageError, decode_image, folder_class_names, load_image_folder, read_class_file, split_anchors
from .core.locality import AnchorSubspace, LocalEditor, local_edit
from .core.models import DEFAULT_ARCH, MODELS, create_model, default_editable_prefix, editable_names, weight_layer_names
from .core.torchvision_models import StagedTorchvision, load_model, read_weights
# experiments: fixers, the edit protocol and training
from .experiments.fixers import (FIXERS, EditorFixer, FinetuneFixer, Fixer, LookupFixer, LookupTable, PatchResult,
                                 finetune, penultimate_features)
from .experiments.metrics import EditRecord, draw_edits, evaluate_edits, summarize
from .experiments.training import TrainConfig, accuracy, train
# lab: sessions, sources, comparisons and measurements the app serves
from .lab.compare import MethodOutcome, compare_fixes, hyperparameter_text
from .lab.measure import (MAX_EDITS, MEASURE_PROTOCOLS, MIN_EDITS, PROTOCOL_LABELS, MeasureCancelled,
                          MeasureRow, MeasureSettings, ProtocolRuns, ResultCache, cached_rows, edits_csv, measure,
                          measure_command, prepare_editors, results_json, summary_csv)
from .lab.session import (DEFAULT_EDITOR, Corrections, EditEntry, EditOutcome, EditReport, EditSession, EditSettings,
                          HeldOutScore, ImageRef, SettingsError, SharedModel, image_digest, lesson_editors, read_log,
                          replay_summary, view_names)
from .lab.sources import FolderSetup, add_folder_arguments, folder_setup_from_args, open_folder_setup
from .lab.workspace import (SORTS, SOURCE_NAE, SOURCE_TEST, SOURCE_UPLOADS, BrowseItem, BrowsePage, BrowseQuery, Lab,
                            Workspace, limit_allocator_retention)

# the names above; not the subpackages (core, experiments, lab), which are imported by path
__all__ = [name for name, value in globals().items() if not name.startswith("_") and not isinstance(value, _ModuleType)]
