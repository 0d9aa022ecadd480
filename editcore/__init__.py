"""editcore: Editable Neural Networks (Sinitsin et al., ICLR 2020) as a GUI-free library."""
from .checkpoint import Checkpoint, load_checkpoint, read_card, save_checkpoint
from .data import (CLASSES, DataError, ImageSet, augment, load_cifar10, load_sample, load_train_sample, normalize,
                   resolve_data_root)
from .device import DEFAULT_THREADS, arithmetic, arithmetic_differences, pick_device
from .edit import EditableModel, EditResult, edit, edit_loss, eval_mode, logit_margins
from .augment_views import augmented_views, generalization, view_families, view_specs
from .editors import EDITORS, Editor, create_editor, register_editor
from .locality import AnchorSubspace, LocalEditor, local_edit
from .fixers import (FIXERS, EditorFixer, FinetuneFixer, Fixer, LookupFixer, LookupTable, PatchResult, finetune,
                     penultimate_features)
from .heldout import HeldOutEvaluator, full_logits
from .metrics import EditRecord, draw_edits, evaluate_edits, summarize
from .models import DEFAULT_ARCH, MODELS, create_model, default_editable_prefix, editable_names, weight_layer_names
from .training import TrainConfig, accuracy, train
from .session import (DEFAULT_EDITOR, Corrections, EditEntry, EditOutcome, EditReport, EditSession, EditSettings,
                      HeldOutScore, ImageRef, SettingsError, SharedModel, image_digest, read_log, replay_summary, view_names)
from .compare import MethodOutcome, compare_fixes
from .measure import (DEFAULT_EDITORS, MAX_EDITS, MEASURE_PROTOCOLS, MIN_EDITS, PROTOCOL_LABELS, MeasureCancelled,
                      MeasureRow, MeasureSettings, ProtocolRuns, ResultCache, cached_rows, edits_csv, measure,
                      measure_command, prepare_editors, results_json, summary_csv)
from .domain import CIFAR10, Domain
from .images import ImageError, decode_image, folder_class_names, load_image_folder, read_class_file, split_anchors
from .torchvision_models import StagedTorchvision, load_model, read_weights
from .sources import FolderSetup, add_folder_arguments, folder_setup_from_args, open_folder_setup
from .workspace import (SORTS, SOURCE_NAE, SOURCE_TEST, SOURCE_UPLOADS, BrowseItem, BrowsePage, BrowseQuery, Lab,
                        Workspace, limit_allocator_retention)

__all__ = [name for name in dir() if not name.startswith("_")]
