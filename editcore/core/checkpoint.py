"""Checkpoints: safetensors weights with the JSON model card in the header and beside the file.

Loading reads tensors and JSON only, never a pickle, so a checkpoint from anyone is safe to open.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .editors import Editor, editor_from_state
from .models import StagedNet, create_model

EDITOR_KEY = "editor."


@dataclass
class Checkpoint:
    model: StagedNet
    editor: Editor | None
    card: dict


def git_commit() -> str:
    """HEAD (+ '-dirty'), or $EDITLAB_GIT_COMMIT for a copy of the tree without .git (a remote GPU machine)."""
    fallback = os.environ.get("EDITLAB_GIT_COMMIT", "unknown")
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else fallback
    except (OSError, subprocess.SubprocessError):
        return fallback


def card_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | Path, model: StagedNet, card: dict, editor: Editor | None = None) -> Path:
    """Write weights (+ editor hyper-parameter tensors) and the card; `card['arch']` is required."""
    if "arch" not in card:
        raise ValueError("a model card needs at least 'arch'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if editor is not None:
        card = {**card, "editor": {"name": editor.name, **editor.hyperparameters()}}
        tensors.update({EDITOR_KEY + k: v.detach().cpu() for k, v in editor.state_dict().items()})
    text = json.dumps(card, indent=2, sort_keys=True)
    save_file(tensors, str(path), metadata={"card": text})
    card_path(path).write_text(text + "\n")
    return path


def header_metadata(path: str | Path, kind: str = "checkpoint") -> dict[str, str]:
    """The string metadata of a safetensors file's header (no tensor is loaded); `kind` names the file
    in the messages of FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path} is not a safetensors {kind}: {exc}") from exc


def read_card(path: str | Path) -> dict:
    """The card from the safetensors header (no tensor is loaded)."""
    metadata = header_metadata(path)
    if "card" not in metadata:
        raise ValueError(f"{path} has no model card in its header")
    try:
        card = json.loads(metadata["card"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} has a damaged model card: {exc}") from None
    if not isinstance(card, dict) or "arch" not in card:
        raise ValueError(f"{path} has a damaged model card: expected an object with an \"arch\"")
    return card


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    card = read_card(path)
    if card.get("model_source") == "torchvision":  # an edit of your own model, exported: it needs its image folder
        raise ValueError(f"{path} is an edited {card['arch']}; open it as your own model: --model {card['arch']} "
                         f"--weights {path} --images DIR (its card gives the classes and preprocessing)")
    model = create_model(card["arch"]).to(device)
    try:
        tensors = load_file(str(path), device=str(device))
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(EDITOR_KEY)})
        editor = None
        if "editor" in card:
            state = {k[len(EDITOR_KEY):]: v for k, v in tensors.items() if k.startswith(EDITOR_KEY)}
            editor = editor_from_state(card["editor"]["name"], state).to(device)
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and the editor raise many types; all mean "damaged"
        raise ValueError(f"{path} is not a usable {card['arch']} checkpoint: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0]}") from None
    return Checkpoint(model.eval(), editor, card)
