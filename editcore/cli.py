"""`python -m editcore COMMAND --help`: train, evaluate-edits, info, download-cifar10."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import data as data_mod
from .checkpoint import git_commit, load_checkpoint, read_card, save_checkpoint
from .device import pick_device
from .edit import EditableModel
from .editors import EDITORS, create_editor
from .fixers import FINETUNE_DEFAULT_LR, FIXERS, LOOKUP_DEFAULT_THRESHOLD, EditorFixer, FinetuneFixer, Fixer, LookupFixer
from .metrics import HeldOutEvaluator, evaluate_edits
from .models import MODELS
from .training import TrainConfig, accuracy, train


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


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


def cmd_train(args) -> int:
    device = pick_device(args.device)
    train_set, test_set = load_split("train", args.data_root), load_split("test", args.data_root)
    if args.train_subset:
        train_set = train_set.subset(torch.arange(min(args.train_subset, len(train_set))))
    config = TrainConfig(
        arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, editable=args.editable, editable_prefix=args.editable_prefix,
        editor=args.editor, editor_lr=args.editor_lr, learnable_editor=not args.fixed_editor, max_steps=args.max_steps,
        c_edit=args.c_edit, c_loc=args.c_loc, order="first" if args.first_order else "second",
        warmup_epochs=args.warmup_epochs,
    )
    init_model = init_editor = None
    if args.init:
        init = load_checkpoint(args.init, device)
        if init.card["arch"] != args.arch:
            raise SystemExit(f"--init is a {init.card['arch']} checkpoint but --arch is {args.arch}")
        init_model, init_editor = init.model, (init.editor if init.editor and init.editor.name == args.editor else None)
    torch.manual_seed(args.seed)
    say(f"training {args.arch} on {len(train_set)} images, device {device}, "
        f"{'editable' if args.editable else 'baseline'} objective")
    model, editor, summary = train(config, train_set, test_set, device, init_model, init_editor, log=say)
    test = test_set.to(device)
    card = {
        "arch": args.arch,
        "params": sum(p.numel() for p in model.parameters()),
        "objective": "editable" if args.editable else "baseline",
        "editable_prefix": summary["config"]["editable_prefix"],
        "data": {"train": train_set.source, "n_train": len(train_set), "test": test.source, "n_test": len(test)},
        "command": "python -m editcore " + shlex.join(sys.argv[1:]),
        "init": args.init or None,
        "seed": args.seed,
        "epochs": args.epochs,
        "test_accuracy": accuracy(model, test.images, test.labels),
        "wall_seconds": summary["wall_seconds"],
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_config": summary["config"],
        "history": summary["history"],
    }
    exact = test.indices < 1000
    if test.source == "cifar10-test" and bool(exact.any()):
        card["test_accuracy_exact_0_999"] = accuracy(model, test.images[exact], test.labels[exact])
    path = save_checkpoint(args.out, model.cpu(), card, editor.cpu() if editor is not None else None)
    say(f"saved {path} (test accuracy {card['test_accuracy']:.4f}, {card['wall_seconds']} s)")
    return 0


def build_fixer(args, editable: EditableModel, editor, device) -> Fixer:
    """The fix evaluate-edits measures: the editor, fine-tuning with replay, or a lookup table."""
    if args.fixer == "editor":
        return EditorFixer(editable, editor, args.max_steps)
    if args.fixer == "finetune":
        if data_mod.resolve_data_root(args.data_root) is None:
            say("fine-tuning replays training images, but with no data root the replay images are the embedded test "
                "sample, the same images it is scored on: fine for a smoke test, not for a measurement")
        replay = load_split("train", args.data_root).to(device)
        return FinetuneFixer(editable.model, replay, args.replay_ratio, args.finetune_optimizer, args.finetune_lr,
                             args.finetune_steps, seed=args.seed)
    mode = "exact" if args.fixer == "lookup-exact" else "nearest"
    return LookupFixer(editable.model, mode, args.lookup_space, args.lookup_threshold)


def cmd_evaluate_edits(args) -> int:
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device)
    prefix = args.editable_prefix or ckpt.card.get("editable_prefix") or "layer3"
    editable = EditableModel(ckpt.model, prefix)
    learned = ckpt.editor is not None and args.editor in (None, ckpt.editor.name) and args.lr is None
    editor = ckpt.editor if learned else create_editor(args.editor or "rmsprop", lr=args.lr)
    test_set = load_split("test", args.data_root)
    heldout_set = test_set if not args.heldout_size else test_set.subset(torch.arange(min(args.heldout_size, len(test_set))))
    evaluator = HeldOutEvaluator(editable, heldout_set.images.to(device), heldout_set.labels.to(device))
    fixer = build_fixer(args, editable, editor, device)
    using = (f"{editor.name} {editor.hyperparameters()} ({'learned' if learned else 'given'})" if args.fixer == "editor"
             else f"{fixer.name} {fixer.hyperparameters()}")
    say(f"{args.n_edits} edits with {using}, held-out {len(heldout_set)} images, base error {evaluator.base_error:.4f}")
    step = max(1, args.n_edits // 10)
    summary, records = evaluate_edits(
        editable, editor, evaluator, test_set, n_edits=args.n_edits, seed=args.seed, max_steps=args.max_steps,
        progress=lambda i, n: say(f"  {i}/{n} edits") if i % step == 0 else None, fixer=fixer, verbose=args.verbose,
    )
    summary.update(checkpoint=str(args.checkpoint), editor=editor.name, editor_hparams=editor.hyperparameters(),
                   editor_learned=learned, protocol="random", device=str(device), data=test_set.source)
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


def cmd_info(args) -> int:
    try:
        card = read_card(args.path)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from exc
    print(json.dumps(card, indent=2, sort_keys=True))
    return 0


def cmd_download(args) -> int:
    import torchvision  # only this command needs it, and only with internet

    root = Path(args.data_root or data_mod.resolve_data_root(None) or "data").expanduser()
    torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    say(f"CIFAR-10 is in {root / data_mod.BATCH_DIR}; set EDITLAB_DATA={root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editcore", description="EditLab: editable neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="baseline or editable training; writes safetensors + model card")
    add_common(p)
    p.add_argument("--arch", default="resnet20", choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", default="", choices=["", "sgd", "adam"], help="default: sgd, or adam with --editable")
    p.add_argument("--lr", type=float, default=0.0, help="peak outer learning rate (default 0.1 sgd / 1e-3 adam)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--editable", action="store_true", help="editable training (L_base + c_edit L_edit + c_loc L_loc)")
    p.add_argument("--editable-prefix", default="", help="module prefix(es) the editor changes (default: arch's, layer3)")
    p.add_argument("--editor", default="rmsprop", choices=sorted(EDITORS))
    p.add_argument("--editor-lr", type=float, default=1e-3)
    p.add_argument("--fixed-editor", action="store_true", help="do not learn the editor's lr/beta")
    p.add_argument("--max-steps", type=int, default=10, help="k, the editor's step budget")
    p.add_argument("--c-edit", type=float, default=0.01)
    p.add_argument("--c-loc", type=float, default=0.01)
    p.add_argument("--first-order", action="store_true", help="do not backpropagate through the editor's gradients")
    p.add_argument("--init", default=None, help="start from this checkpoint (fine-tuning)")
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    p.add_argument("--out", required=True, help="output .safetensors path (card also written as .json)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate-edits", help="the paper's protocol: N seeded edits, drawdown on held-out images")
    add_common(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--editor", default=None, choices=sorted(EDITORS), help="default: the checkpoint's learned editor, else rmsprop")
    p.add_argument("--lr", type=float, default=None, help="editor learning rate (default: learned, else the editor's default)")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--n-edits", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--editable-prefix", default="", help="default: the checkpoint's")
    p.add_argument("--heldout-size", type=int, default=0, help="score on the first M test images only (0: all)")
    p.add_argument("--records", default=None, help="write per-edit records (JSON) here")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--fixer", default="editor", choices=FIXERS,
                   help="editor: the gradient editor; finetune: SGD/Adam with replayed training images; "
                        "lookup-exact / lookup-nn: a patch table that overrides predictions (see docs/FIXERS.md)")
    p.add_argument("--lookup-space", default="pixel", choices=sorted(LOOKUP_DEFAULT_THRESHOLD),
                   help="lookup-nn distance: pixel (mean |diff|/255) or feature (cosine, penultimate layer)")
    p.add_argument("--lookup-threshold", type=float, default=None,
                   help=f"lookup-nn match threshold (default {LOOKUP_DEFAULT_THRESHOLD})")
    p.add_argument("--finetune-optimizer", default="sgd", choices=sorted(FINETUNE_DEFAULT_LR))
    p.add_argument("--finetune-lr", type=float, default=None, help=f"default {FINETUNE_DEFAULT_LR}")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning step budget per fix")
    p.add_argument("--replay-ratio", type=int, default=15, help="replayed training images per corrected sample in each step")
    p.add_argument("--verbose", action="store_true", help="add per-augmentation-family generalization")
    p.set_defaults(func=cmd_evaluate_edits)

    p = sub.add_parser("info", help="print a checkpoint's model card")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download-cifar10", help="download CIFAR-10 with torchvision (needs internet)")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (data_mod.DataError, ValueError, FileNotFoundError) as exc:
        say(f"error: {exc}")
        return 2
