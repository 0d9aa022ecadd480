"""What one loaded model holds for all sessions: held-out feature caches (one per split stage), the base
probabilities and its weights, after an edit with the local editor (`layer3.0.conv1`) and one with RMSProp on
`layer3`, whose edits begin in the same stage and so share one cache.

    .venv/bin/python bench/model_memory.py [--data-root ../shared/data/cifar10]

Prints one line; docs/RELIABILITY.md ("Sessions and memory") quotes it with the command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from editcore import EditSession, EditSettings, ImageRef, SharedModel, load_cifar10  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="default: $EDITLAB_DATA, else the embedded sample")
    parser.add_argument("--checkpoint", default=str(ROOT / "assets/resnet20_editable.safetensors"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    test = load_cifar10("test", args.data_root)
    shared = SharedModel("model", args.checkpoint, test)
    session = EditSession(shared)
    for settings in (EditSettings(), EditSettings(editor="rmsprop", layers="layer3")):
        session.reset()
        session.apply(test.images[0][None], [int(test.labels[0] + 1) % 10], settings, [ImageRef("test", 0)])
    caches = {split: evaluator.features for split, evaluator in shared.primary.evaluators.items()}
    tensors = [*shared.model.parameters(), *shared.model.buffers()]
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    print(f"{len(test):,} held-out images; after a local and an RMSProp edit: {len(caches)} feature cache(s) "
          f"(split stage {sorted(caches)}), {', '.join(mb(f.nbytes) for f in caches.values())}; base probabilities "
          f"{mb(shared.base_heldout_probs.nbytes)}; weights and buffers {mb(sum(t.nbytes for t in tensors))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
