"""EditLab app: `python app.py` then open http://127.0.0.1:7860 (see docs/APP.md)."""
import argparse
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no outside connection

import torch  # noqa: E402

from editcore import (DEFAULT_THREADS, SHIPPED_MODELS, DataError, Lab, add_folder_arguments,  # noqa: E402
                      folder_setup_from_args, limit_allocator_retention, pick_device, prepare_editors, read_card)

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINTS = [f"{name}={path}" for name, path in SHIPPED_MODELS.items()]


def checkpoint_names(values: list[str] | None) -> list[tuple[str, Path]]:
    """--checkpoint values (repeated or comma-separated, each PATH or NAME=PATH) as (name, path).
    Without a name, the card's objective names it: 'baseline' or 'editable'."""
    explicit = values is not None
    items = [item.strip() for value in (values or DEFAULT_CHECKPOINTS) for item in value.split(",") if item.strip()]
    named = []
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(path).expanduser()
        if not name:
            name = (read_card(path).get("objective") if path.is_file() else None) or path.stem
        if name in dict(named):
            name = f"{name}-{path.stem}"
        if explicit and not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        named.append((name, path))
    return named


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EditLab: browse, edit and inspect an editable image classifier.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--data-root", default=None,
                        help="folder with cifar-10-batches-py: browse and score on all 10,000 test images "
                             "(default: $EDITLAB_DATA, else the embedded 1,000-image sample)")
    parser.add_argument("--checkpoint", action="append", default=None, metavar="[NAME=]PATH",
                        help="a model to edit; repeat or comma-separate for several (default: "
                             "assets/resnet20_scratch_baseline.safetensors and assets/resnet20_scratch_editable.safetensors)")
    parser.add_argument("--nae", default=str(ASSETS / "cifar10_nae.npz"),
                        help="natural adversarial examples to browse, when the file exists")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch CPU threads per computation (default {DEFAULT_THREADS} on every machine: the count "
                             "changes the last bits of an edit, so a fixed one lets edit logs replay the same elsewhere)")
    parser.add_argument("--replicas", type=int, default=0,
                        help="copies of each model, so that many edits run at once (default: CPU cores / threads)")
    add_folder_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_allocator_retention()  # before the lab's threads allocate: RSS falls back when sessions leave
    say = lambda *parts: print(*parts, file=sys.stderr, flush=True)  # noqa: E731
    if args.threads < 1:
        say(f"error: --threads must be at least 1, got {args.threads}")
        return 2
    torch.set_num_threads(args.threads)
    replicas = args.replicas or max(1, (os.cpu_count() or 1) // torch.get_num_threads())
    try:
        if args.model is not None and (args.checkpoint or args.data_root):
            raise ValueError("--model opens your own model and images: leave out --checkpoint and --data-root")
        setup = folder_setup_from_args(args, pick_device(args.device))
        if setup is not None:
            lab = Lab.load_folder(setup, replicas=replicas, log=say)
        else:
            lab = Lab.load(checkpoint_names(args.checkpoint), data_root=args.data_root, device=args.device,
                           nae_path=args.nae, log=say, replicas=replicas)
    except (FileNotFoundError, DataError, ValueError) as exc:
        say(f"error: {exc}")
        return 2
    for note in lab.notes:
        say(f"warning: {note}")
    from app import launch  # gradio is imported only once the lab is ready

    # The local editor's anchor subspaces in the background: the first edit and the first protocol run skip them.
    threading.Thread(target=prepare_editors, args=(lab.models,), daemon=True).start()
    launch(lab, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
