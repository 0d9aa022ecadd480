"""Baseline and editable training.

Editable training minimises  L_base + c_edit * L_edit(theta_k) + c_loc * L_loc(theta, theta_k):
theta_k is the model after the editor's steps (at most k) on one training image with a drawn
target; L_loc is KL(p_theta || p_theta_k) on the training batch, both with batch norm in eval mode
as edits run. Gradients flow through the editor's steps (second order, or first order on request).

One step is `train_step`, one pass `train_epoch`; the data order comes from a seeded permutation,
so a DistributedSampler-style shard of it is all DDP would need.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .data import ImageSet, augment, normalize
from .edit import EditableModel, edit, edit_loss, eval_mode
from .editors import Editor, create_editor
from .models import StagedNet, create_model, default_editable_prefix


@dataclass
class TrainConfig:
    arch: str = "resnet20"
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = ""  # '' -> sgd for baseline, adam for editable (the paper's outer optimizer)
    lr: float = 0.0  # 0 -> 0.1 for sgd, 1e-3 for adam (scaled by batch_size / 128)
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    channels_last: bool = True
    editable: bool = False
    editable_prefix: str = ""  # '' -> the architecture's default (paper, CIFAR: layer3)
    editor: str = "rmsprop"
    editor_lr: float = 1e-3
    learnable_editor: bool = True
    max_steps: int = 10
    c_edit: float = 0.01
    c_loc: float = 0.01
    order: str = "second"
    edit_targets: str = "random"  # or 'match-ranks'
    rank_probs: list[float] = field(default_factory=list)  # match-ranks: P(rank r) for the target
    time_budget_s: float = 0.0  # >0: after the first steps, cut the epoch count to fit this budget

    def resolved(self) -> "TrainConfig":
        c = TrainConfig(**asdict(self))
        c.optimizer = c.optimizer or ("adam" if c.editable else "sgd")
        c.lr = c.lr or ((0.1 if c.optimizer == "sgd" else 1e-3) * c.batch_size / 128)
        c.editable_prefix = c.editable_prefix or default_editable_prefix(c.arch)
        if c.edit_targets not in ("random", "match-ranks"):
            raise ValueError("edit_targets must be 'random' or 'match-ranks'")
        if c.edit_targets == "match-ranks" and not c.rank_probs:
            raise ValueError("match-ranks training needs rank_probs (see editcore.nae.rank_distribution)")
        return c


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


def train_step(model, editable, editor, optimizer, x, y, train_set, config, gen) -> dict:
    model.train()
    logits = model(x)
    loss = base = nn.functional.cross_entropy(logits, y)
    # Tensors, not floats: converting every step would stall the GPU; the epoch loop sums them.
    stats = {"loss_base": base.detach(), "correct": (logits.argmax(1) == y).sum()}
    if config.editable:
        i = torch.randint(0, len(train_set), (1,), generator=gen).to(train_set.images.device)
        x_edit = normalize(train_set.images[i])
        if config.channels_last:
            x_edit = x_edit.contiguous(memory_format=torch.channels_last)
        with eval_mode(model):
            with torch.no_grad():
                target = draw_edit_targets(model(x_edit), train_set.labels[i], config, gen)
            result = edit(editable, x_edit, target, editor, config.max_steps, order=config.order)
            loss_edit = edit_loss(result.final_logits, target)
            features = editable.features(x)
            ref = editable.logits_from_features(features).detach()
            loss_loc = kl_div(ref, editable.logits_from_features(features, result.params))
        loss = base + config.c_edit * loss_edit + config.c_loc * loss_loc
        stats.update(loss_edit=loss_edit.detach(), loss_loc=loss_loc.detach(), edit_success=float(result.success),
                     edit_steps=float(result.steps))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return stats


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    config: TrainConfig,
    train_set: ImageSet,
    test_set: ImageSet | None = None,
    device: torch.device | str = "cpu",
    init_model: StagedNet | None = None,
    init_editor: Editor | None = None,
    log=print,
) -> tuple[StagedNet, Editor | None, dict]:
    """Train and return (model, editor or None, summary dict for the model card)."""
    config = config.resolved()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    device = torch.device(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick the fastest kernels
    model = init_model if init_model is not None else create_model(config.arch)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    editor = editable = None
    params = [p for p in model.parameters()]
    if config.editable:
        editor = init_editor or create_editor(config.editor, lr=config.editor_lr, learnable=config.learnable_editor)
        editor = editor.to(device).requires_grad_(config.learnable_editor)
        editable = EditableModel(model, config.editable_prefix)
        params += [p for p in editor.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', not {config.optimizer!r}")
    train_set = train_set.to(device)
    test_set = test_set.to(device) if test_set is not None else None
    steps_per_epoch = len(train_set) // config.batch_size
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)
    history, step, start = [], 0, time.time()
    epoch = 0
    while epoch < config.epochs:
        order = torch.randperm(len(train_set), generator=gen).to(device)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", file=sys.stderr,
                   mininterval=5, leave=False, disable=None)
        for b in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, config.lr)
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = normalize(augment(train_set.images[idx], gen))
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            stats = train_step(model, editable, editor, optimizer, x, train_set.labels[idx], train_set, config, gen)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            step += 1
            if step == 10:
                timer = time.time()  # steps before this one pay for warm-up (allocator, cuDNN autotune)
            if step == 60 and config.time_budget_s > 0:
                # Fit the schedule to the budget early (still in warm-up), so the cosine still ends at 0.
                per_epoch = (time.time() - timer) / 50 * steps_per_epoch
                fitting = max(1, int(config.time_budget_s / (per_epoch * 1.05)))
                if fitting < config.epochs:
                    log(f"time budget {config.time_budget_s:.0f} s: ~{per_epoch:.1f} s/epoch, running {fitting} "
                        f"of {config.epochs} epochs")
                    config.epochs, total = fitting, steps_per_epoch * fitting
            if b % 20 == 0:
                bar.set_postfix(loss=f"{float(stats['loss_base']):.3f}", acc=f"{float(sums['correct']) / ((b + 1) * len(idx)):.3f}")
        sums = {k: float(v) for k, v in sums.items()}
        record = {"epoch": epoch + 1, "seconds": round(time.time() - start, 1),
                  "train_accuracy": sums["correct"] / (steps_per_epoch * config.batch_size)}
        record.update({k: v / steps_per_epoch for k, v in sums.items() if k != "correct"})
        if test_set is not None:
            record["test_accuracy"] = accuracy(model, test_set.images, test_set.labels)
        if editor is not None:
            record["editor"] = editor.hyperparameters()
        history.append(record)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        epoch += 1
    model = model.to(memory_format=torch.contiguous_format).eval()
    summary = {"config": asdict(config), "wall_seconds": round(time.time() - start, 1), "history": history}
    return model, editor, summary
