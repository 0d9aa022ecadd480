"""Run by test_training.py under `torch.distributed.run --nproc_per_node=2` (gloo): for a baseline and an
editable step on TinyNet, each rank saves the gradients of its own half-batch step alone ('own.') and of the
same step under DistributedDataParallel ('ddp.') to OUT_DIR/{kind}_rank{r}.safetensors."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # editcore, when run as a script

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import make_tiny, tiny_images  # noqa: E402
from editcore import EditableModel, create_editor, normalize  # noqa: E402
from editcore.experiments.training import recipe_config, train_step  # noqa: E402
from test_training import TINY  # noqa: E402


def step_grads(net, model, editor, config, x, y, data, rank) -> dict[str, torch.Tensor]:
    """The gradients one train_step leaves (an optimizer with lr 0 leaves the weights as they are)."""
    trained = [p for p in model.parameters()] + ([p for p in editor.parameters() if p.requires_grad] if editor else [])
    optimizer = torch.optim.SGD(trained, lr=0.0)
    train_step(net, EditableModel(model, "body"), editor, optimizer, x, y, data, config,
               torch.Generator().manual_seed(100 + rank))  # the same edit in both passes, another on each rank
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if editor is not None:
        grads.update({f"editor.{n}": torch.zeros_like(p) if p.grad is None else p.grad.clone()
                      for n, p in editor.named_parameters() if p.requires_grad})
    return grads


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = tiny_images()
    x, y = normalize(data.images[:8])[rank::world], data.labels[:8][rank::world]
    for kind in ("baseline", "editable"):
        config = recipe_config("default", **TINY, editable=kind == "editable").resolved()
        model = make_tiny()
        editor = create_editor("rmsprop", lr=0.05, learnable=True) if config.editable else None
        start = {k: v.clone() for k, v in model.state_dict().items()}
        own = step_grads(model, model, editor, config, x, y, data, rank)
        model.load_state_dict(start)  # undo the batch-norm statistics of that pass
        if editor is not None:
            editor.zero_grad(set_to_none=True)
        ddp = step_grads(torch.nn.parallel.DistributedDataParallel(model), model, editor, config, x, y, data, rank)
        tensors = {f"own.{k}": v for k, v in own.items()} | {f"ddp.{k}": v for k, v in ddp.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{kind}_rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
