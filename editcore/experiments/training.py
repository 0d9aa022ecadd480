"""Baseline and editable training, resumable, on one process or many (torchrun + DDP).

Editable training minimises  L_base + c_edit * L_edit(theta_k) + c_loc * L_loc(theta, theta_k):
theta_k is the model after the editor's steps (at most k) on one training image with a drawn
target; L_loc is KL(p_theta || p_theta_k) on the training batch, p_theta_k with batch norm in eval mode
as edits run, p_theta the training forward's own predictions (batch norm in training mode, detached), as
the paper's code has it. That reference also ties the eval-mode network to what the training forward
learns: with the unedited eval-mode model as reference instead (`loc_reference='eval'`, EditLab's runs
before 2026-12-03), nothing does, and from scratch the eval-mode network collapsed to near-uniform
predictions (test accuracy 10% after one epoch), where any edit is cheap. Gradients flow through the
editor's steps (second order, or first order on request).

Randomness comes from two seeded generators: `data` (the epoch's permutation and the augmentation of
each global batch) is the same on every rank, so rank r trains on rows r, r + world, ... of the batch
a single process would use; `edit` (the edited image and its target) differs per rank. Under torchrun
the model is wrapped in DistributedDataParallel for the training forward; the edit runs on the
underlying module (its inner gradients are not DDP's to reduce) and the final backward lets DDP average
the model's gradients, the editor's learnable parameters are averaged by hand.

`train(..., state_path=...)` writes a resumable state (train_state.py) after every epoch (and every
`state_every_steps` steps); `train(..., resume=load_state(path))` continues bit for bit.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..core.data import ImageSet, augment, normalize
from ..core.edit import EditableModel, edit, edit_loss, eval_mode
from ..core.editors import EDITORS, Editor, create_editor
from ..core.heldout import HeldOutEvaluator
from .metrics import evaluate_edits
from ..core.models import StagedNet, create_model, default_editable_prefix
from .train_state import save_state

SCHEDULES = ("cosine", "constant")
LOC_REFERENCES = ("training", "eval")
LOCAL_ANCHORS = 2000  # training images whose inputs span what a local edit must leave alone


@dataclass
class TrainConfig:
    arch: str = "resnet20"
    epochs: int = 30
    batch_size: int = 128  # the global batch: each of N ranks trains on batch_size / N images a step
    optimizer: str = ""  # '' -> sgd for baseline, adam for editable (the paper's outer optimizer)
    lr: float = 0.0  # 0 -> 0.1 for sgd, 1e-3 for adam (scaled by batch_size / 128)
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # after warm-up: cosine to 0, or 'constant' (the paper's code)
    clip_grad_norm: float = 0.0  # >0: clip the outer gradient's global norm (the paper's code: 10)
    seed: int = 0
    channels_last: bool = True
    editable: bool = False
    editable_prefix: str = ""  # '' -> the architecture's default (paper, CIFAR: layer3)
    editor: str = "rmsprop"
    editor_lr: float = 0.0  # 0 -> 1e-3 for the gradient editors, the editor's own default for the local one
    learnable_editor: bool = True
    max_steps: int = 0  # 0 -> 10 (the paper's k), or the editor's own default for the local one
    c_edit: float = 0.01
    c_loc: float = 0.01
    order: str = "second"
    loc_reference: str = "training"  # L_loc's p_theta: the training forward's predictions, or 'eval' (see above)
    edit_targets: str = "random"  # or 'match-ranks'
    rank_probs: list[float] = field(default_factory=list)  # match-ranks: P(rank r) for the target
    val_size: int = 0  # >0: the last N training images are held out; the best epoch on them is kept
    val_edits: int = 50  # editable training: seeded edits scoring drawdown on the held-out images each epoch
    patience: int = 0  # >0 (with val_size): stop after this many epochs without a better validation score
    time_budget_s: float = 0.0  # >0: after the first steps, cut the epoch count to fit this budget

    def resolved(self) -> "TrainConfig":
        c = TrainConfig(**asdict(self))
        c.optimizer = c.optimizer or ("adam" if c.editable else "sgd")
        c.lr = c.lr or ((0.1 if c.optimizer == "sgd" else 1e-3) * c.batch_size / 128)
        if c.editor not in EDITORS:
            raise ValueError(f"unknown editor {c.editor!r}; choose from {sorted(EDITORS)}")
        # An editor with its own procedure (the local one) edits without a graph: it trains first order,
        # theta_k = theta + (the edit's change, held fixed), and has nothing learnable.
        editor_class = EDITORS[c.editor]
        own_procedure = c.editable and not editor_class.differentiable
        if own_procedure:
            c.order, c.learnable_editor = "first", False
        c.editor_lr = c.editor_lr or (editor_class.default_lr if own_procedure else 1e-3)
        c.max_steps = c.max_steps or (editor_class.default_max_steps if own_procedure else 10)
        c.editable_prefix = c.editable_prefix or (own_procedure and editor_class.default_layers) or \
            default_editable_prefix(c.arch)
        if c.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', not {c.optimizer!r}")
        if c.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {c.schedule!r}")
        if c.loc_reference not in LOC_REFERENCES:
            raise ValueError(f"loc_reference must be one of {LOC_REFERENCES}, got {c.loc_reference!r}")
        if c.clip_grad_norm < 0 or c.val_size < 0 or c.val_edits < 0 or c.patience < 0:
            raise ValueError("clip_grad_norm, val_size, val_edits and patience must be >= 0")
        if c.patience and not c.val_size:
            raise ValueError("early stopping (patience) needs a validation split: set val_size")
        if c.edit_targets not in ("random", "match-ranks"):
            raise ValueError("edit_targets must be 'random' or 'match-ranks'")
        if c.edit_targets == "match-ranks" and not c.rank_probs:
            raise ValueError("match-ranks training needs rank_probs (see editcore.experiments.nae.rank_distribution)")
        return c


# The paper's own code (its CIFAR notebook, `EditableTrainer` defaults): trained from scratch with Adam at
# lr 1e-3 over all parameters (no decay, no schedule), gradient norm clipped at 10, c_edit = c_loc = 0.01,
# uniformly random edit targets, the editor IngraphRMSProp (lr 1e-3 fixed, beta from 0.5 learned), and
# early stopping on error and drawdown (here measured on held-out training images, not on the test set).
RECIPES: dict[str, dict] = {
    "default": {},
    "paper": dict(editable=True, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", warmup_epochs=0.0,
                  clip_grad_norm=10.0, editor="rmsprop-paper", editor_lr=1e-3, learnable_editor=True, max_steps=10,
                  c_edit=0.01, c_loc=0.01, order="second", edit_targets="random", epochs=200, val_size=2000,
                  val_edits=50, patience=20),
}


def recipe_config(recipe: str, **given) -> TrainConfig:
    """The recipe's settings, overridden by the ones `given`."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    return TrainConfig(**{**RECIPES[recipe], **given})


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy with batch norm in eval mode; images uint8 on the model's device."""
    correct = 0
    with eval_mode(model):
        for i in range(0, len(labels), batch_size):
            logits = model(normalize(images[i : i + batch_size]))
            correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / max(1, len(labels))


def draw_edit_targets(logits: torch.Tensor, labels: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random classes, or (match-ranks) the class at a rank drawn from config.rank_probs."""
    n, classes = logits.shape
    if config.edit_targets == "random":
        return torch.randint(0, classes, (n,), generator=gen).to(logits.device)
    probs = torch.tensor(config.rank_probs[:classes], dtype=torch.float)
    ranks = torch.multinomial(probs, n, replacement=True, generator=gen).to(logits.device)
    order = logits.argsort(dim=1, descending=True)
    return order.gather(1, ranks.view(-1, 1)).squeeze(1)


def kl_div(ref_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_new), mean over the batch."""
    ref = torch.log_softmax(ref_logits, 1)
    return (ref.exp() * (ref - torch.log_softmax(new_logits, 1))).sum(1).mean()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_across_ranks(tensors: list[torch.Tensor]) -> None:
    """In place: the mean over ranks (every rank calls this with the same list)."""
    rank, world = rank_and_world()
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)


def sync_editor_grads(editor: Editor | None) -> None:
    """DDP reduces the model's gradients; the editor is not part of its module, so average its own. A rank
    whose edit succeeded without a step has no editor gradient: it contributes zeros."""
    if editor is None:
        return
    learnable = [p for p in editor.parameters() if p.requires_grad]
    for p in learnable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    average_across_ranks([p.grad for p in learnable])


def train_step(net, editable, editor, optimizer, x, y, edit_pool, config, gen) -> dict:
    """One outer step. `net` runs the training forward (the model, or DDP around it); the edit and the
    locality term run on `editable.model` itself."""
    net.train()
    logits = net(x)
    loss = base = nn.functional.cross_entropy(logits, y)
    # Tensors, not floats: converting every step would stall the GPU; the epoch loop sums them.
    stats = {"loss_base": base.detach(), "correct": (logits.argmax(1) == y).sum()}
    if config.editable:
        model = editable.model
        i = torch.randint(0, len(edit_pool), (1,), generator=gen).to(edit_pool.images.device)
        x_edit = normalize(edit_pool.images[i])
        if config.channels_last:
            x_edit = x_edit.contiguous(memory_format=torch.channels_last)
        with eval_mode(model):
            with torch.no_grad():
                target = draw_edit_targets(model(x_edit), edit_pool.labels[i], config, gen)
            if not editor.differentiable:  # first order: the edit's change, held fixed, on the live weights
                result = edit(editable, x_edit, target, editor, config.max_steps)
                live = editable.base_params()
                edited = {n: p + (result.params[n] - p).detach() for n, p in live.items()}
                final_logits = editable.logits(x_edit, edited)
            else:
                result = edit(editable, x_edit, target, editor, config.max_steps, order=config.order)
                edited, final_logits = result.params, result.final_logits
            loss_edit = edit_loss(final_logits, target)
            features = editable.features(x)
            ref = logits if config.loc_reference == "training" else editable.logits_from_features(features)
            loss_loc = kl_div(ref.detach(), editable.logits_from_features(features, edited))
        loss = base + config.c_edit * loss_edit + config.c_loc * loss_loc
        stats.update(loss_edit=loss_edit.detach(), loss_loc=loss_loc.detach(), edit_success=float(result.success),
                     edit_steps=float(result.steps))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(net, nn.parallel.DistributedDataParallel):
        sync_editor_grads(editor)
    if config.clip_grad_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stats["grad_norm"] = nn.utils.clip_grad_norm_(params, config.clip_grad_norm).detach()
    optimizer.step()
    return stats


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "cosine") -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def split_validation(train_set: ImageSet, val_size: int) -> tuple[ImageSet, ImageSet | None]:
    """(training part, the last `val_size` images held out), or (all, None)."""
    if not val_size:
        return train_set, None
    if val_size >= len(train_set):
        raise ValueError(f"val_size {val_size} leaves no training images out of {len(train_set)}")
    cut = len(train_set) - val_size
    return train_set.subset(torch.arange(cut)), train_set.subset(torch.arange(cut, len(train_set)))


def validate(editable: EditableModel, editor: Editor | None, val_set: ImageSet, config: TrainConfig) -> dict:
    """Error on the held-out training images and, with an editor, the drawdown and success of a fixed set of
    seeded edits on them (each to one of the other classes). The score to minimise: error + drawdown, the
    held-out error after one edit."""
    evaluator = HeldOutEvaluator(editable, val_set.images, val_set.labels)
    record = {"val_error": evaluator.base_error}
    if editor is not None and config.val_edits:
        summary, _ = evaluate_edits(editable, editor, evaluator, val_set, n_edits=config.val_edits, seed=config.seed,
                                    max_steps=config.max_steps, targets="other")
        record.update(val_drawdown=summary["drawdown"], val_edit_success=summary["success_rate"])
    record["val_score"] = record["val_error"] + record.get("val_drawdown", 0.0)
    return record


def best_epoch_rule(config: TrainConfig, edits: bool) -> str:
    """`validate`'s rule in words, for the model card."""
    scored = f"error + drawdown of {config.val_edits} seeded edits" if edits and config.val_edits else "error"
    stop = f"; stop after {config.patience} epochs without a better one" if config.patience else ""
    return f"the epoch with the lowest validation {scored} on the last {config.val_size} training images (held out){stop}"


def rng_states(data_gen: torch.Generator, edit_gen: torch.Generator, device: torch.device) -> list[dict]:
    """Every rank's generator states (a collective: all ranks call it), rank order."""
    mine = {"torch": torch.get_rng_state(), "data": data_gen.get_state(), "edit": edit_gen.get_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    rank, world = rank_and_world()
    if world == 1:
        return [mine]
    comm = _comm_device()
    gathered = {}
    for key, value in mine.items():
        parts = [torch.empty_like(value, device=comm) for _ in range(world)]
        dist.all_gather(parts, value.to(comm))
        gathered[key] = [p.cpu() for p in parts]
    return [{key: gathered[key][r] for key in mine} for r in range(world)]


def restore_rng(state: dict, data_gen: torch.Generator, edit_gen: torch.Generator, device: torch.device) -> None:
    mine = state["rng"][rank_and_world()[0]]
    torch.set_rng_state(mine["torch"])
    data_gen.set_state(mine["data"])
    edit_gen.set_state(mine["edit"])
    if "cuda" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)
    # Training draws from neither; restored so that code which does stays reproducible too.
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python_rng"])


def _numpy_rng() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _copy(state_dict: dict) -> dict:
    return {k: v.detach().clone() for k, v in state_dict.items()}


def train(
    config: TrainConfig,
    train_set: ImageSet,
    test_set: ImageSet | None = None,
    device: torch.device | str = "cpu",
    init_model: StagedNet | None = None,
    init_editor: Editor | None = None,
    log=print,
    state_path: str | Path | None = None,
    state_every_steps: int = 0,
    resume: dict | None = None,
    stop_after_steps: int = 0,
    state_meta: dict | None = None,
    train_more: bool = True,
    keep_best: bool = True,
) -> tuple[StagedNet, Editor | None, dict]:
    """Train and return (model, editor or None, summary dict for the model card).

    With `state_path`, the resumable state is written there after every epoch (and every `state_every_steps`
    steps); `resume` (from `train_state.load_state`) continues such a run with its own config (`config`,
    `init_model` and `init_editor` are then ignored). `stop_after_steps` > 0 stops once that many steps are
    done in all, as an interruption would, after writing the state: summary['finished'] is then False.
    `state_meta` is stored in the state as is (the CLI keeps its command and data there). `train_more=False`
    with `resume` takes no step and returns the state's best epoch so far (its latest weights without a
    validation split; `keep_best=False`: its latest weights in any case), writing nothing:
    summary['epochs_done'] says how far the run had come. Under torchrun
    (a process group is initialised) every rank calls this; only rank 0 logs and writes the state.
    """
    rank, world = rank_and_world()
    config = TrainConfig(**resume["config"]) if resume else config.resolved()
    if resume and resume["world_size"] != world:
        raise ValueError(f"the state was written by {resume['world_size']} processes; resume it with as many, not {world}")
    if config.batch_size % world:
        raise ValueError(f"batch size {config.batch_size} does not split evenly across {world} processes")
    log = log if rank == 0 else (lambda *_: None)
    torch.manual_seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed)
    edit_gen = torch.Generator().manual_seed(1_000_003 * (rank + 1) + config.seed)  # its own stream per rank
    device = torch.device(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick the fastest kernels
    train_set, val_set = split_validation(train_set, config.val_size)
    model = init_model if init_model is not None else create_model(config.arch)
    if resume:
        model.load_state_dict(resume["model"])
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    editor = None
    editable = EditableModel(model, config.editable_prefix)
    params = list(model.parameters())
    if config.editable:
        # The local editor's anchors: training images (its subspace is recomputed every epoch).
        anchors = {} if EDITORS[config.editor].differentiable else {"anchors": train_set.images[:LOCAL_ANCHORS]}
        editor = init_editor if init_editor is not None and not resume else \
            create_editor(config.editor, lr=config.editor_lr, **anchors)
        if resume:
            editor.load_state_dict(resume["editor"])
        editor = editor.to(device).set_learnable(config.learnable_editor)
        params += [p for p in editor.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_set = train_set.to(device)
    val_set = val_set.to(device) if val_set is not None else None
    test_set = test_set.to(device) if test_set is not None else None
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images make no batch of {config.batch_size}")
    per_rank = config.batch_size // world

    epoch = batch = step = 0
    seconds_before, history, best, order, sums = 0.0, [], None, None, {}
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        progress = resume["progress"]
        epoch, batch, step, seconds_before = progress["epoch"], progress["batch"], progress["step"], progress["seconds"]
        history, best = resume["history"], resume["best"]
        sums = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in resume["sums"].items()}
        order = resume["order"].to(device) if resume["order"] is not None else None
        restore_rng(resume, data_gen, edit_gen, device)
        log(f"resuming at epoch {epoch + 1}, step {step} ({batch}/{steps_per_epoch} of the epoch)")
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)
    start, timer = time.time(), None

    def write_state(finished: bool) -> None:
        rngs = rng_states(data_gen, edit_gen, device)  # collective: every rank takes part
        if rank != 0 or state_path is None:
            return
        save_state(state_path, {
            "config": asdict(config), "meta": state_meta or {}, "world_size": world, "finished": finished,
            "progress": {"epoch": epoch, "batch": batch, "step": step,
                         "seconds": round(seconds_before + time.time() - start, 1)},
            "order": order, "sums": sums, "history": history, "best": best,
            "model": model.state_dict(), "editor": editor.state_dict() if editor is not None else None,
            "optimizer": optimizer.state_dict(), "rng": rngs, "numpy_rng": _numpy_rng(), "python_rng": random.getstate(),
        })

    interrupted = False
    while train_more and epoch < config.epochs and not interrupted:
        if batch == 0:
            order = torch.randperm(len(train_set), generator=data_gen).to(device)
            sums = {}
        if editor is not None:
            editor.weights_changed(editable)  # once an epoch (and on resume)
        bar = tqdm(range(batch, steps_per_epoch), desc=f"epoch {epoch + 1}", file=sys.stderr,
                   mininterval=5, leave=False, disable=None if rank == 0 else True)
        for b in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, config.lr, config.schedule)
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = normalize(augment(train_set.images[idx], data_gen))[rank::world]  # the whole batch's draws, my rows
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            stats = train_step(net, editable, editor, optimizer, x, train_set.labels[idx][rank::world], train_set,
                               config, edit_gen)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            step, batch = step + 1, b + 1
            if step == 10:
                timer = time.time()  # steps before this one pay for warm-up (allocator, cuDNN autotune)
            if step == 60 and config.time_budget_s > 0 and timer is not None:
                # Fit the schedule to the budget early (still in warm-up), so the cosine still ends at 0.
                per_epoch = (time.time() - timer) / 50 * steps_per_epoch
                fitting = max(1, int(config.time_budget_s / (per_epoch * 1.05)))
                if fitting < config.epochs:
                    log(f"time budget {config.time_budget_s:.0f} s: ~{per_epoch:.1f} s/epoch, running {fitting} "
                        f"of {config.epochs} epochs")
                    config.epochs, total = fitting, steps_per_epoch * fitting
            if b % 20 == 0:
                bar.set_postfix(loss=f"{float(stats['loss_base']):.3f}", acc=f"{float(sums['correct']) / ((b + 1) * len(x)):.3f}")
            if stop_after_steps and step >= stop_after_steps:
                interrupted = True
                break
            if state_every_steps and step % state_every_steps == 0:
                write_state(finished=False)
        if interrupted:
            break
        totals = {k: float(v) for k, v in sums.items()}
        record = {"epoch": epoch + 1, "seconds": round(seconds_before + time.time() - start, 1),
                  "train_accuracy": totals["correct"] / (steps_per_epoch * per_rank)}
        record.update({k: v / steps_per_epoch for k, v in totals.items() if k != "correct"})
        stop = False
        if rank == 0:  # statistics are rank 0's; its weights are every rank's (its buffers: the ones DDP broadcasts)
            if test_set is not None:
                record["test_accuracy"] = accuracy(model, test_set.images, test_set.labels)
            if val_set is not None:
                record.update(validate(editable, editor, val_set, config))
                if best is None or record["val_score"] < best["score"]:
                    best = {"epoch": epoch + 1, "score": record["val_score"], "model": _copy(model.state_dict()),
                            "editor": _copy(editor.state_dict()) if editor is not None else None}
                stop = bool(config.patience) and epoch + 1 - best["epoch"] >= config.patience
            if editor is not None:
                record["editor"] = editor.hyperparameters()
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        history.append(record)
        epoch, batch = epoch + 1, 0
        if world > 1:  # every rank must leave the loop at the same epoch
            flag = torch.tensor([float(stop)], device=_comm_device())
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            log(f"early stop: no better validation score (error + drawdown) for {config.patience} epochs")
            config.epochs = epoch
        write_state(finished=epoch >= config.epochs)
    if interrupted:
        write_state(finished=False)
        log(f"stopped after step {step} as asked; continue with the state {state_path}")
    summary = {"config": asdict(config), "wall_seconds": round(seconds_before + time.time() - start, 1),
               "history": history, "world_size": world, "finished": not interrupted, "steps": step,
               "epochs_done": epoch}
    if best is not None and not interrupted and keep_best:
        model.load_state_dict(best["model"])
        if editor is not None:
            editor.load_state_dict(best["editor"])
        summary["best_epoch"] = best["epoch"]
        summary["best_val_score"] = best["score"]
        summary["best_epoch_rule"] = best_epoch_rule(config, editor is not None)
        log(f"keeping epoch {best['epoch']} (validation error + drawdown {best['score']:.4f})")
    if editor is not None:
        summary["editor_trained"] = [n for n, p in editor.named_parameters() if p.requires_grad]
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, editor, summary
