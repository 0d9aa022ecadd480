"""`python -m editcore COMMAND --help`: train, evaluate-edits, info, download-cifar10."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .core import data as data_mod
from .core.checkpoint import git_commit, load_checkpoint, read_card, save_checkpoint
from .core.device import pick_device
from .core.edit import EditableModel
from .core.editors import EDITORS, create_editor
from .core.heldout import HeldOutEvaluator, full_logits
from .core.images import load_image_folder
from .core.anchor_stats import ANCHOR_STATS_DIR, anchor_covariances, save_anchor_stats
from .core.locality import DEFAULT_EDITOR, LocalEditor, local_weight_names
from .core.models import MODELS, create_model
from .experiments import nae as nae_mod
from .experiments.fixers import (FINETUNE_DEFAULT_LR, FINETUNE_DEFAULTS, FIXERS, LOOKUP_DEFAULT_THRESHOLD, EditorFixer,
                                 FinetuneFixer, Fixer, LookupFixer)
from .experiments.metrics import evaluate_edits
from .experiments.torchrun import Ranks
from .experiments.train_state import load_state
from .experiments.training import LOC_REFERENCES, RECIPES, SCHEDULES, TrainConfig, accuracy, recipe_config, train
from .lab.measure import (DEFAULT_N_EDITS, MEASURE_PROTOCOLS, PROTOCOL_TARGETS, ProtocolSets,
                          protocol_editor, protocol_sets)
from .lab.session import lesson_editors
from .lab.sources import add_folder_arguments, folder_setup_from_args


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


@contextlib.contextmanager
def edits_bar(show: bool = True, desc: str = "edits"):
    """A tqdm bar on stderr like training's, moved by evaluate_edits' progress(done, total)."""
    bar = tqdm(desc=desc, unit="edit", file=sys.stderr, mininterval=1, leave=False, disable=None if show else True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def load_split(split: str, data_root: str | None) -> data_mod.ImageSet:
    """The split from the data root; with none, the embedded test sample, and say so."""
    if data_mod.resolve_data_root(data_root) is None:
        say(f"no data root (--data-root / EDITLAB_DATA): using the embedded sample ({data_mod.SAMPLE_PATH.name}, "
            f"CIFAR-10 test images) for the {split} split")
        return data_mod.load_sample()
    return data_mod.load_cifar10(split, data_root)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py (default: $EDITLAB_DATA)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def rank_targets_from_nae(args, init_model, device):
    """Match-ranks: P(rank) from the true labels' ranks on the NAE set under the starting model.
    Returns that model (created from the seed when there is no --init) and the card entry."""
    nae_set = nae_mod.load_nae(args.nae)
    if init_model is None:
        torch.manual_seed(args.seed)  # the same initial weights train() would create from this seed
        init_model = create_model(args.arch)
        say("match-ranks without --init: ranks come from an untrained model, so they are close to uniform")
    ranks = nae_mod.true_label_ranks(init_model.to(device), nae_set.images, nae_set.labels, device)
    entry = {"nae": str(args.nae), "n_nae": len(nae_set), "rank_model": args.init or f"initial {args.arch}, seed {args.seed}",
             "rank_histogram": nae_mod.rank_histogram(ranks), "rank_probs": nae_mod.rank_distribution(ranks)}
    say(f"match-ranks: true-label rank histogram on {len(nae_set)} NAE images {entry['rank_histogram']}, "
        f"P(rank) {[round(p, 3) for p in entry['rank_probs']]}")
    return init_model, entry


# Training flags a --recipe may set: argparse leaves them None unless given (dest = TrainConfig field).
RECIPE_FLAGS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "schedule", "clip_grad_norm",
                "editable", "editor", "editor_lr", "max_steps", "c_edit", "c_loc", "val_size", "val_edits", "patience",
                "loc_reference")


def train_config_from_args(args) -> TrainConfig:
    given = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}
    if args.fixed_editor:
        given["learnable_editor"] = False
    if args.first_order:
        given["order"] = "first"
    return recipe_config(args.recipe, arch=args.arch, seed=args.seed, editable_prefix=args.editable_prefix,
                         time_budget_s=args.time_budget_s, **given)


def cmd_train(args) -> int:
    """One process, or DDP across the processes torchrun started (see docs/SCALING.md)."""
    ranks = Ranks.from_env()
    device = ranks.device(pick_device(args.device))
    with ranks.joined(device):
        return run_training(args, device)


def run_training(args, device: torch.device) -> int:
    if args.checkpoint_from_state and not args.resume:
        raise SystemExit("--checkpoint-from-state needs --resume STATE")
    if args.latest and not args.checkpoint_from_state:
        raise SystemExit("--latest goes with --checkpoint-from-state")
    command = "python -m editcore " + shlex.join(args.argv)
    resume = load_state(args.resume) if args.resume else None
    if resume:
        meta = resume["meta"]
        if not args.checkpoint_from_state:
            meta["resumed"] = meta.get("resumed", []) + [{"command": command, "git_commit": git_commit()}]
    else:  # the code that trains, not whatever HEAD is when training ends
        meta = {"command": command, "git_commit": git_commit(), "init": args.init, "train_subset": args.train_subset,
                "recipe": args.recipe}
    train_set, test_set = load_split("train", args.data_root), load_split("test", args.data_root)
    if meta["train_subset"]:
        train_set = train_set.subset(torch.arange(min(meta["train_subset"], len(train_set))))
    data = {"train": train_set.source, "n_train": len(train_set)}
    if resume and meta["data"] != data:
        raise ValueError(f"the state was trained on {meta['data']}, this data is {data}: pass the same --data-root")
    meta["data"] = data
    config = train_config_from_args(args)
    init_model = init_editor = None
    if args.init and not resume:
        init = load_checkpoint(args.init, device)
        if init.card["arch"] != args.arch:
            raise SystemExit(f"--init is a {init.card['arch']} checkpoint but --arch is {args.arch}")
        init_model, init_editor = init.model, (init.editor if init.editor and init.editor.name == config.editor else None)
    if args.edit_targets == "match-ranks" and not resume:
        if not config.editable:
            raise SystemExit("--edit-targets match-ranks applies to editable training: add --editable")
        init_model, meta["match_ranks"] = rank_targets_from_nae(args, init_model, device)
        config.edit_targets, config.rank_probs = "match-ranks", meta["match_ranks"]["rank_probs"]
    state_path = args.state or args.resume
    if not dist.is_initialized() or dist.get_rank() == 0:
        arch = resume["config"]["arch"] if resume else config.arch
        say(f"{'resuming' if resume else 'training'} {arch} on {len(train_set)} images, device {device}"
            + (f", {dist.get_world_size()} processes" if dist.is_initialized() else "")
            + (f", state {state_path}" if state_path else ""))
    model, editor, summary = train(config, train_set, test_set, device, init_model, init_editor, log=say,
                                   state_path=state_path, state_every_steps=args.state_every_steps, resume=resume,
                                   stop_after_steps=args.stop_after_steps, state_meta=meta,
                                   train_more=not args.checkpoint_from_state, keep_best=not args.latest)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    if not summary["finished"]:
        say(f"no checkpoint yet: continue with --resume {state_path}")
        return 0
    test = test_set.to(device)
    config = summary["config"]
    card = {
        "arch": config["arch"],
        "params": sum(p.numel() for p in model.parameters()),
        "objective": "editable" if config["editable"] else "baseline",
        "editable_prefix": config["editable_prefix"],
        "data": {**meta["data"], "test": test.source, "n_test": len(test)},
        "command": meta["command"],
        "init": meta["init"],
        "recipe": meta["recipe"],
        "seed": config["seed"],
        "epochs": config["epochs"],
        "steps": summary["steps"],
        "world_size": summary["world_size"],
        "test_accuracy": accuracy(model, test.images, test.labels),
        "wall_seconds": summary["wall_seconds"],
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": meta["git_commit"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_config": config,
        "history": summary["history"],
    }
    if args.checkpoint_from_state:
        card["from_state"] = {"command": command, "state": args.resume, "epochs_done": summary["epochs_done"], "steps": summary["steps"],
                              "finished": resume["finished"], "weights": "latest" if args.latest else "best epoch"}
    for key in ("best_epoch", "best_val_score", "best_epoch_rule", "editor_trained"):
        if key in summary:
            card[key] = summary[key]
    for key in ("match_ranks", "resumed"):
        if key in meta:
            card[key] = meta[key]
    exact = test.indices < 1000
    if test.source == "cifar10-test" and bool(exact.any()):
        card["test_accuracy_exact_0_999"] = accuracy(model, test.images[exact], test.labels[exact])
    path = save_checkpoint(args.out, model.cpu(), card, editor.cpu() if editor is not None else None)
    say(f"saved {path} (test accuracy {card['test_accuracy']:.4f}, {card['wall_seconds']} s)")
    return 0


def build_fixer(args, editable: EditableModel, editor, device, model_layers: str = "",
                replay: data_mod.ImageSet | None = None) -> Fixer:
    """The fix evaluate-edits measures: the editor, fine-tuning with replay, or a lookup table. Fine-tuning
    trains `model_layers` (the checkpoint's editable layers, where its defaults were tuned) unless
    --finetune-layers says otherwise, not the editor's own: on one conv (the local editor's earlier default), fine-tuning fixed only
    6 of 10 R edits of the sample within its budget (issue 21). `replay`: fine-tuning's training images (your own
    model's anchors), else CIFAR-10's."""
    if args.fixer == "editor":
        return EditorFixer(editable, editor, args.max_steps)
    if args.fixer == "finetune":
        if replay is None and data_mod.resolve_data_root(args.data_root) is None:
            replay = data_mod.load_train_sample()
            say(f"no data root: fine-tuning replays the shipped sample of {len(replay):,} CIFAR-10 training images "
                f"({data_mod.TRAIN_SAMPLE_PATH.name})")
        elif replay is None:
            replay = data_mod.load_cifar10("train", args.data_root)
        layers = args.finetune_layers or model_layers or editable.prefixes
        return FinetuneFixer(editable.model, replay.to(device), args.replay_ratio, args.finetune_optimizer,
                             args.finetune_lr, args.finetune_steps, seed=args.seed, prefix=None if layers == "all" else layers)
    mode = "exact" if args.fixer == "lookup-exact" else "nearest"
    return LookupFixer(editable.model, mode, args.lookup_space, args.lookup_threshold)


def cmd_evaluate_edits(args) -> int:
    """The protocol in one process, or sharded across the processes torchrun started (see docs/SCALING.md)."""
    ranks = Ranks.from_env()
    device = ranks.device(pick_device(args.device))
    with ranks.joined(device, args.threads):
        return evaluate_edits_on_ranks(args, ranks, device)


def evaluate_edits_on_ranks(args, ranks: Ranks, device: torch.device) -> int:
    if args.model is not None and (args.checkpoint or args.data_root):
        raise ValueError("--model opens your own model and images: leave out --checkpoint and --data-root")
    if args.model is None and not args.checkpoint:
        raise ValueError("evaluate-edits needs --checkpoint, or --model torchvision:ARCH with --weights and --images")
    if args.model is not None and args.protocol == "nae" and not args.nae_images:
        raise ValueError("--protocol nae with --model needs --nae-images DIR (e.g. ImageNet-A, in class folders named "
                         "as the model's classes)")
    setup = folder_setup_from_args(args, device)
    ckpt = setup.checkpoint if setup else load_checkpoint(args.checkpoint, device)
    # The paper judges both models under the editor editable training learned: --editor-from takes it from there.
    learned_editor = load_checkpoint(args.editor_from, device).editor if args.editor_from else ckpt.editor
    if args.editor_from and (learned_editor is None or learned_editor.name != args.editor):
        raise ValueError(f"--editor-from {args.editor_from}: that checkpoint learned no {args.editor} editor "
                         f"(it has {learned_editor.name if learned_editor else 'none'}); name its editor with --editor")
    editor, learned = protocol_editor(args.editor, learned_editor, args.lr)
    # An editor's own default layers (the local editor's conv) are the model's choice for it when it names one.
    own = editor.default_layers and (ckpt.card.get("local_layer") or editor.default_layers)
    prefix = args.editable_prefix or own or ckpt.card.get("editable_prefix") or "layer3"
    editable = EditableModel(ckpt.model, prefix, anchors=setup.anchors.images if setup else None)
    if args.max_steps is None:
        args.max_steps = editor.default_max_steps  # build_fixer and the summary read it from args
    test_set = setup.heldout if setup else load_split("test", args.data_root)
    if setup and ranks.is_main:
        for note in setup.notes:
            say(note)
    if setup and args.protocol == "nae":  # your own natural adversarial examples, edited to their true labels
        nae_set, skipped = load_image_folder(args.nae_images, ckpt.model.domain, f"nae:{Path(args.nae_images).name}")
        if skipped and ranks.is_main:
            say(f"{len(skipped)} file(s) in {args.nae_images} are not readable images and were skipped")
        heldout = test_set.subset(torch.arange(min(args.heldout_size, len(test_set)))) if args.heldout_size else test_set
        sets = ProtocolSets(nae_set, heldout, PROTOCOL_TARGETS["nae"], False)
    else:
        sets = protocol_sets(args.protocol, test_set, args.heldout_size,
                             nae_mod.load_nae(args.nae) if args.protocol == "nae" else None, say)
    edit_set, heldout_set, predictions = sets.edit_set, sets.heldout_set, None
    if args.protocol == "corrections":
        predictions = full_logits(ckpt.model, edit_set.images.to(device)).argmax(1)
    evaluator = HeldOutEvaluator(editable, heldout_set.images.to(device), heldout_set.labels.to(device),
                                 mixed_precision=False if args.precision == "float32" else None)
    fixer = build_fixer(args, editable, editor, device,
                        args.editable_prefix or ckpt.card.get("editable_prefix") or "layer3", setup and setup.anchors)
    using = (f"{editor.name} {editor.hyperparameters()} ({'learned' if learned else 'given'})" if args.fixer == "editor"
             else f"{fixer.name} {fixer.hyperparameters()}")
    if ranks.is_main:
        say(f"{args.n_edits} edits with {using}, held-out {len(heldout_set)} images ({evaluator.precision}), "
            f"base error {evaluator.base_error:.4f}, {ranks.world_size} process(es) x {torch.get_num_threads()} thread(s)")
    with edits_bar(ranks.is_main) as bar:
        summary, records = evaluate_edits(
            editable, editor, evaluator, edit_set, n_edits=args.n_edits, targets=sets.targets, seed=args.seed,
            max_steps=args.max_steps, progress=bar, fixer=fixer, verbose=args.verbose, ranks=ranks, predictions=predictions,
        )
    if not ranks.is_main:
        return 0
    summary.update(checkpoint=str(args.checkpoint or args.weights), editor=editor.name, editor_hparams=editor.hyperparameters(),
                   editor_learned=learned, editor_from=args.editor_from, protocol=args.protocol, layers=prefix,
                   device=str(device), data=test_set.source,
                   edit_source_overlaps_heldout=sets.overlaps,
                   threads=torch.get_num_threads())
    if args.protocol == "nae":
        summary.update(nae=str(args.nae_images if setup else args.nae), n_nae=len(edit_set))
    if args.records:
        Path(args.records).write_text(json.dumps([r.__dict__ for r in records]) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        for key in ("fixer", "test_error", "drawdown", "success_rate", "mean_steps", "mean_edit_seconds", "generalization",
                    "n_edits", "n_heldout", "seconds"):
            print(f"{key:>18}: {summary[key]}")
        for family, value in summary.get("generalization_by_family", {}).items():
            print(f"{'gen. ' + family:>18}: {value}")
    return 0


def named_checkpoints(values: list[str]) -> dict[str, Path]:
    """--checkpoint NAME=PATH or PATH (named by its card's objective: baseline / editable) -> {name: path}."""
    named: dict[str, Path] = {}
    for value in values:
        name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        name = name or read_card(path).get("objective") or Path(path).stem
        named[name if name not in named else f"{name}-{Path(path).stem}"] = Path(path)
    return named


def cmd_measure(args) -> int:
    """The app's Measure tab on the command line: evaluate-edits for every checkpoint x editor, one table.
    Each row's numbers are those of the evaluate-edits command it names."""
    from .lab.measure import MeasureSettings, measure, results_json
    from .lab.session import SharedModel

    commit, load_start = git_commit(), os.getloadavg()  # the code that runs, not whatever HEAD is when it ends
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    test_set = load_split("test", args.data_root)
    nae_set = nae_mod.load_nae(args.nae) if args.protocol == "nae" else None
    checkpoints = named_checkpoints(args.checkpoint or [str(path) for path in data_mod.SHIPPED_MODELS.values()])
    models = {name: SharedModel(name, path, test_set, device) for name, path in checkpoints.items()}
    settings = MeasureSettings(args.protocol, args.n_edits, args.seed, tuple(args.editor or lesson_editors(models)))
    with edits_bar() as bar:
        rows = measure(models, settings, test_set, nae_set, data_root=data_mod.resolve_data_root(args.data_root) is not None,
                       progress=lambda done, total, stage: bar(done, total), bounded=False)
    print(f"{'model':>10} {'editor':>14} {'test error':>10} {'drawdown (95% CI)':>26} {'success':>8} {'steps':>6} "
          f"{'general.':>8} {'s/edit':>7}")
    for row in rows:
        s = row.summary
        low, high = s["drawdown_ci95"]
        print(f"{row.model:>10} {row.editor:>14} {s['test_error']:>10.4f} {s['drawdown']:>9.4f} [{low:.4f}, {high:.4f}] "
              f"{s['success_rate']:>8.3f} {s['mean_steps']:>6.2f} {s.get('generalization', float('nan')):>8.3f} "
              f"{s['mean_edit_seconds']:>7.3f}")
    if args.out:
        command = "python -m editcore " + shlex.join(args.argv)
        if args.data_root is None and data_mod.resolve_data_root(None) is not None:
            command = "EDITLAB_DATA=/path/to/cifar10 " + command  # the data root came from the environment
        results = results_json(rows, command, commit, device=str(device), data=test_set.source,
                               load_average_start=[round(x, 2) for x in load_start],
                               load_average_end=[round(x, 2) for x in os.getloadavg()])
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        say(f"wrote {args.out}")
    return 0


def cmd_build_nae(args) -> int:
    """Adversarial filtration of the test pool by >= 3 filter models of >= 2 architectures."""
    cards = [read_card(path) for path in args.filters]
    archs = sorted({card["arch"] for card in cards})
    if len(cards) < 3 or len(archs) < 2:
        raise SystemExit(f"build-nae needs at least 3 filter models of at least 2 architectures (got {len(cards)}: "
                         f"{', '.join(card['arch'] for card in cards)}); train them with `python -m editcore train --arch ... --seed ...`")
    reference_cards = [read_card(path) for path in args.reference]  # fail on a bad path before the long part
    shared = {Path(p).resolve() for p in args.filters} & {Path(p).resolve() for p in args.reference}
    if shared:
        raise SystemExit(f"a filter model cannot also be a reference model: {', '.join(map(str, sorted(shared)))}")
    if data_mod.resolve_data_root(args.data_root) is None:
        raise SystemExit("build-nae filters the full CIFAR-10 test set: set --data-root or EDITLAB_DATA. "
                         + data_mod.DOWNLOAD_HINT)
    device = pick_device(args.device)
    pool = nae_mod.pool_part(data_mod.load_cifar10("test", args.data_root))
    start = time.perf_counter()
    predictions = nae_mod.filter_predictions([load_checkpoint(path, device).model for path in args.filters], pool, device)
    nae_set = nae_mod.nae_from_predictions(pool, predictions)
    seconds = round(time.perf_counter() - start, 2)
    card = {
        "command": "python -m editcore " + shlex.join(sys.argv[1:]),
        "split": nae_mod.SPLIT_DEFINITION,
        "filtration": "pool images that every filter model misclassifies (top-1)",
        "filter_models": [{"checkpoint": str(path), "arch": card["arch"], "seed": card.get("seed"),
                           "test_accuracy": card.get("test_accuracy"),
                           "pool_accuracy": float((row == pool.labels).double().mean())}
                          for path, card, row in zip(args.filters, cards, predictions)],
        "n_pool": len(pool),
        "reference_models": [],
        "seconds": seconds,
        "device": str(device),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"pool {len(pool)} images (test {nae_mod.NAE_POOL[0]}-{nae_mod.NAE_POOL[1] - 1}); "
          f"NAE {len(nae_set)} ({len(nae_set) / max(1, len(pool)):.2%}), filtration {seconds} s")
    for entry in card["filter_models"]:
        print(f"  filter {entry['arch']} seed {entry['seed']}: pool accuracy {entry['pool_accuracy']:.4f}")
    for path, ref_card in zip(args.reference, reference_cards):
        ranks = nae_mod.true_label_ranks(load_checkpoint(path, device).model, nae_set.images, nae_set.labels, device)
        histogram = nae_mod.rank_histogram(ranks)
        entry = {"checkpoint": str(path), "arch": ref_card["arch"], "objective": ref_card.get("objective"),
                 "nae_accuracy": histogram[0] / len(nae_set) if len(nae_set) else None,
                 "true_label_rank_histogram": histogram}
        card["reference_models"].append(entry)
        print(f"  reference {path}: NAE accuracy {entry['nae_accuracy']}, true-label ranks 0..9 {histogram}")
    path = nae_mod.save_nae(args.out, nae_set, card)
    print(f"saved {path} and {nae_mod.card_path(path)}; per class {torch.bincount(nae_set.labels, minlength=10).tolist()}")
    return 0


def cmd_imagenet_a_edits(args) -> int:
    """The NAE protocol on ImageNet-A with a torchvision ResNet (weights from torch's cache)."""
    from .experiments import imagenet_a

    device = pick_device(args.device)
    model = imagenet_a.StagedTorchvisionResNet(imagenet_a.torchvision_resnet(args.torchvision_model))
    editor = create_editor(args.editor, lr=args.lr)
    summary, records = imagenet_a.run_nae_edits(
        model, args.imagenet_a, args.heldout, editor, args.editable_prefix, args.n_edits, args.seed, args.max_steps,
        args.heldout_size, device, progress=lambda i, n: say(f"  {i}/{n} edits") if i % max(1, n // 10) == 0 else None)
    summary.update(model=args.torchvision_model, device=str(device))
    if args.records:
        Path(args.records).write_text(json.dumps([r.__dict__ for r in records]) + "\n")
    print(json.dumps(summary))
    return 0


def cmd_anchor_stats(args) -> int:
    """The local editor's anchor statistics for a checkpoint, written where it finds them (`core.anchor_stats`)."""
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device)
    editable = EditableModel(ckpt.model, args.layers or ckpt.card.get("local_layer") or LocalEditor.default_layers)
    names = local_weight_names(editable)
    if args.data_root:
        images, passes = data_mod.load_cifar10("train", args.data_root).images, args.passes
        anchors = f"the CIFAR-10 training set ({len(images)} images), {passes} augmented (crop/flip) copies of each"
    else:
        if args.passes != 1:
            raise ValueError("--passes needs --data-root: the training sample's statistics are the images themselves")
        images, passes = data_mod.load_train_sample().images, 1
        anchors = f"the shipped training sample ({len(images)} images), as they are"
    generator = torch.Generator().manual_seed(args.seed)

    def batches():
        for _ in tqdm(range(passes), desc="passes", disable=passes == 1):
            for i in tqdm(range(0, len(images), args.batch_size), desc="anchor batches", leave=False):
                batch = images[i : i + args.batch_size]
                batch = data_mod.augment(batch, generator) if args.data_root else batch
                yield ckpt.model.domain.normalize(batch.to(device))

    started = time.perf_counter()
    covariances, count = anchor_covariances(ckpt.model, names, batches())
    out = Path(args.out or ANCHOR_STATS_DIR / f"{Path(args.checkpoint).stem}.safetensors")
    save_anchor_stats(out, ckpt.model, covariances, {
        "anchors": anchors, "images": count, "seed": args.seed, "checkpoint": Path(args.checkpoint).name,
        "layers": editable.prefixes, "seconds": round(time.perf_counter() - started, 1),
        "command": "python -m editcore " + shlex.join(args.argv)})
    say(f"{out}: {len(names)} weights' input covariances over {count} images ({anchors})")
    return 0


def cmd_info(args) -> int:
    card = read_card(args.path)  # a missing or foreign file: main() reports it, exit status 2
    print(json.dumps(card, indent=2, sort_keys=True))
    return 0


def cmd_download(args) -> int:
    import torchvision  # only this command needs it, and only with internet

    # Not resolve_data_root: the folder need not exist yet, and the download goes to the root, not its batch folder.
    root = Path(args.data_root or os.environ.get("EDITLAB_DATA") or "data").expanduser()
    torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    say(f"CIFAR-10 is in {root / data_mod.BATCH_DIR}; set EDITLAB_DATA={root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editcore", description="EditLab: editable neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="baseline or editable training; writes safetensors + model card")
    add_common(p)
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="settings for the flags not given: 'default' (the defaults below) or 'paper' (the paper's "
                        "code: editable, from scratch, Adam lr 1e-3, no decay or schedule, clip 10, rmsprop-paper "
                        "editor, 200 epochs, 2000 held-out training images, 50 edits, patience 20)")
    p.add_argument("--arch", default="resnet20", choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, default=None, help="default 30")
    p.add_argument("--batch-size", type=int, default=None, help="the global batch, split across processes (default 128)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help="default: sgd, or adam with --editable")
    p.add_argument("--lr", type=float, default=None,
                   help="peak outer learning rate (default 0.1 sgd / 1e-3 adam, times batch size / 128)")
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4")
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up (default 1)")
    p.add_argument("--schedule", default=None, choices=SCHEDULES, help="after warm-up (default cosine)")
    p.add_argument("--clip-grad-norm", type=float, default=None, help="clip the outer gradient's norm (default 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--editable", action="store_true", default=None,
                   help="editable training (L_base + c_edit L_edit + c_loc L_loc)")
    p.add_argument("--editable-prefix", default="", help="module prefix(es) the editor changes (default: arch's, layer3)")
    p.add_argument("--editor", default=None, choices=sorted(EDITORS), help="default rmsprop")
    p.add_argument("--editor-lr", type=float, default=None, help="default 1e-3 (local: its step scale 1)")
    p.add_argument("--fixed-editor", action="store_true", help="do not learn the editor's lr/beta")
    p.add_argument("--max-steps", type=int, default=None, help="k, the editor's step budget (default 10; local: 20)")
    p.add_argument("--c-edit", type=float, default=None, help="default 0.01")
    p.add_argument("--c-loc", type=float, default=None, help="default 0.01")
    p.add_argument("--first-order", action="store_true", help="do not backpropagate through the editor's gradients")
    p.add_argument("--loc-reference", default=None, choices=LOC_REFERENCES,
                   help="L_loc's reference predictions: the training forward's (default, the paper's code) or the "
                        "unedited model in eval mode (EditLab's runs before 2026-12-03)")
    p.add_argument("--val-size", type=int, default=None,
                   help="hold out the last N training images; keep the epoch with the lowest error + drawdown on them "
                        "(default 0: keep the last epoch)")
    p.add_argument("--val-edits", type=int, default=None, help="seeded edits scoring the held-out drawdown (default 50)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after N epochs without a better held-out score (default 0: never)")
    p.add_argument("--init", default=None, help="start from this checkpoint (fine-tuning)")
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="cut --epochs early on to fit this many seconds")
    p.add_argument("--edit-targets", default="random", choices=["random", "match-ranks"],
                   help="editable training's edit targets: uniform classes, or ranks drawn as on the NAE set (--nae)")
    p.add_argument("--nae", default=str(nae_mod.DEFAULT_PATH), help="NAE set for --edit-targets match-ranks")
    p.add_argument("--state", default=None,
                   help="write the resumable training state here (.safetensors + .json) after every epoch")
    p.add_argument("--state-every-steps", type=int, default=0, help="also write the state every N steps")
    p.add_argument("--resume", default=None,
                   help="continue the run whose --state this is, with its settings (training flags are ignored), "
                        "writing the state back there unless --state says otherwise")
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop after N steps in all, state written, no checkpoint (split a run into sessions)")
    p.add_argument("--checkpoint-from-state", action="store_true",
                   help="with --resume: train no further, write --out from the state's best epoch so far (its latest "
                        "weights without --val-size), and leave the state as it is (look at a run while it goes on)")
    p.add_argument("--latest", action="store_true",
                   help="with --checkpoint-from-state: the state's latest weights, not its best epoch (to score epoch N)")
    p.add_argument("--out", required=True, help="output .safetensors path (card also written as .json)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate-edits", help="the paper's protocol: N seeded edits, drawdown on held-out images")
    add_common(p)
    p.add_argument("--checkpoint", default=None, help="an editcore checkpoint (or --model, --weights, --images below)")
    add_folder_arguments(p)
    p.add_argument("--editor", default=DEFAULT_EDITOR, choices=sorted(EDITORS),
                   help=f"default {DEFAULT_EDITOR} (the page's); naming the checkpoint's learned editor uses its learned lr")
    p.add_argument("--lr", type=float, default=None, help="editor learning rate (default: learned, else the editor's default)")
    p.add_argument("--editor-from", default=None, metavar="CHECKPOINT",
                   help="the editor (lr, betas) this other checkpoint learned, e.g. a baseline judged under the editable "
                        "model's editor")
    p.add_argument("--max-steps", type=int, default=None, help="default: the editor's (local 20, the others 10)")
    p.add_argument("--n-edits", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--editable-prefix", default="", help="default: the checkpoint's")
    p.add_argument("--heldout-size", type=int, default=0, help="score on the first M test images only (0: all)")
    p.add_argument("--records", default=None, help="write per-edit records (JSON) here")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--protocol", default="other", choices=sorted(PROTOCOL_TARGETS),
                   help="other (R): random target != true label; corrections (C): true label of images the model gets "
                        "wrong; random: uniform target that may equal the true label (the paper code's); nae: true "
                        "labels of the NAE set (--nae), drawdown on the held-out part. R and C edit test images outside "
                        "the held-out set (--heldout-size M: the first M)")
    p.add_argument("--nae", default=str(nae_mod.DEFAULT_PATH), help="NAE set for --protocol nae")
    p.add_argument("--nae-images", default=None, metavar="DIR",
                   help="with --model: the natural adversarial examples to edit for --protocol nae, in class folders "
                        "(e.g. ImageNet-A with --classes listing the model's wnids); drawdown on --images, "
                        "over all the model's classes")
    p.add_argument("--fixer", default="editor", choices=FIXERS,
                   help="editor: the gradient editor; finetune: SGD/Adam with replayed training images; "
                        "lookup-exact / lookup-nn: a patch table that overrides predictions (see docs/FIXERS.md)")
    p.add_argument("--lookup-space", default="pixel", choices=sorted(LOOKUP_DEFAULT_THRESHOLD),
                   help="lookup-nn distance: pixel (mean |diff|/255) or feature (cosine, penultimate layer)")
    p.add_argument("--lookup-threshold", type=float, default=None,
                   help=f"lookup-nn match threshold (default {LOOKUP_DEFAULT_THRESHOLD})")
    p.add_argument("--finetune-optimizer", default=FINETUNE_DEFAULTS["optimizer"], choices=sorted(FINETUNE_DEFAULT_LR))
    p.add_argument("--finetune-lr", type=float, default=None, help=f"default {FINETUNE_DEFAULT_LR}")
    p.add_argument("--finetune-steps", type=int, default=FINETUNE_DEFAULTS["max_steps"],
                   help="fine-tuning's step budget per fix: it stops at the first step that fixes the image "
                        f"(default {FINETUNE_DEFAULTS['max_steps']})")
    p.add_argument("--finetune-layers", default=None,
                   help="parameters fine-tuning trains: all, or module prefixes such as layer3 or head "
                        "(default: --editable-prefix if given, else the checkpoint's editable layers: layer3 for "
                        "the shipped models)")
    p.add_argument("--replay-ratio", type=int, default=FINETUNE_DEFAULTS["replay_ratio"],
                   help="replayed training images per corrected sample in each step (training set with a data root, "
                        "else the shipped training sample)")
    p.add_argument("--verbose", action="store_true", help="add per-augmentation-family generalization")
    p.add_argument("--precision", default="auto", choices=["auto", "float32"],
                   help="held-out re-evaluation: auto = bfloat16 with float32 for low-margin rows where bfloat16 is "
                        "native (same predictions as float32), else float32; float32 = always float32")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default, or under torchrun the cores split among the local ranks)")
    p.set_defaults(func=cmd_evaluate_edits)

    p = sub.add_parser("measure", help="the app's Measure tab: evaluate-edits for each checkpoint x editor, one table")
    add_common(p)
    p.add_argument("--checkpoint", action="append", default=None, metavar="[NAME=]PATH",
                   help="repeat for several (default: the shipped baseline and editable ResNet-20s)")
    p.add_argument("--editor", action="append", default=None, choices=sorted(EDITORS),
                   help="repeat for several (default: local and the paper's editor, the one a checkpoint learned, else "
                        "rmsprop); the checkpoint's learned editor as it learned it, as evaluate-edits")
    p.add_argument("--protocol", default="other", choices=sorted(MEASURE_PROTOCOLS),
                   help="other (R), corrections (C) or nae, as evaluate-edits; the whole test set held out")
    p.add_argument("--n-edits", type=int, default=DEFAULT_N_EDITS, help="edits per checkpoint and editor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nae", default=str(nae_mod.DEFAULT_PATH), help="NAE set for --protocol nae")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the rows and their per-edit records here (JSON; the app reads "
                                               "assets/measure_defaults.json)")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("build-nae", help="build CIFAR-10-NAE by adversarial filtration (docs/NAE.md)")
    add_common(p)
    p.add_argument("--filters", nargs="+", required=True, help=">= 3 filter checkpoints of >= 2 architectures")
    p.add_argument("--reference", nargs="*", default=[], help="checkpoints to report NAE accuracy and true-label ranks for")
    p.add_argument("--out", default=str(nae_mod.DEFAULT_PATH), help="output .npz (card written beside it as .json)")
    p.set_defaults(func=cmd_build_nae)

    p = sub.add_parser("imagenet-a-edits", help="NAE edits on ImageNet-A with a torchvision ResNet (docs/NAE.md)")
    p.add_argument("--imagenet-a", required=True, help="ImageNet-A folder: <wnid>/*.jpg")
    p.add_argument("--heldout", required=True, help="held-out images, same layout (e.g. ImageNet val); 200-way error")
    p.add_argument("--torchvision-model", default="resnet50", help="a torchvision ResNet; weights must be in torch's cache")
    p.add_argument("--editable-prefix", default="layer4")
    p.add_argument("--editor", default="rmsprop", choices=sorted(EDITORS))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--n-edits", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-size", type=int, default=0, help="score on a seeded subset of M held-out images (0: all)")
    p.add_argument("--records", default=None, help="write per-edit records (JSON) here")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_imagenet_a_edits)

    p = sub.add_parser("anchor-stats", help="the local editor's anchor statistics for a checkpoint (assets/anchor_stats)")
    add_common(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--layers", default=None,
                   help="the local editor's layers (default: the card's local_layer, else the local editor's layer3)")
    p.add_argument("--passes", type=int, default=1, help="with --data-root: augmented copies of each training image")
    p.add_argument("--seed", type=int, default=0, help="seeds the augmentation")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default=None, help="default: assets/anchor_stats/<checkpoint name>.safetensors")
    p.set_defaults(func=cmd_anchor_stats)

    p = sub.add_parser("info", help="print a checkpoint's model card")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download-cifar10", help="download CIFAR-10 with torchvision (needs internet)")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return args.func(args)
    except (data_mod.DataError, ValueError, FileNotFoundError) as exc:
        say(f"error: {exc}")
        return 2
