"""Your own classifier: a torchvision architecture by name plus a weights file, as an editable model.

`load_model("torchvision:resnet18", "W.safetensors", ...)` builds the architecture with as many classes as the
weights' last linear layer has rows, reads the weights (safetensors, or a .pth state dict through
`torch.load(weights_only=True)`, which refuses pickled objects) and names the first keys that do not fit. The
preprocessing (resize, crop, mean, std) comes from a torchvision weights enum when one is named
(`ResNet18_Weights.IMAGENET1K_V1`), else from the caller's flags. The result is a `Checkpoint` whose card says
where the model came from (file, sha256, classes, preprocessing, how it is run).

Parameter names stay torchvision's (`layer3.0.conv1.weight`), so an exported edit loads back with the same
command. Builders whose forward is a chain of stages run as one (`STAGED_FAMILIES`): held-out activations are
cached at the edited stage and only the stages after it are re-run. Any other builder (ViT, MobileNetV2,
Inception, ...) runs as a single stage: every held-out re-evaluation is then a full forward pass.
"""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint
from .domain import Domain
from .models import StagedNet, weight_layer_names

PREFIX = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLATTEN = "flatten"  # a head step that is torch.flatten(x, 1), not a module
WHOLE = "<forward>"  # the one step of a model run as one stage: the builder's own forward
# Builder name pattern -> (stages as module paths, or "features" for each child of `features`; the head's steps).
STAGED_FAMILIES = (
    (r"(resnet|resnext|wide_resnet)\d", ((("conv1", "bn1", "relu", "maxpool"), ("layer1",), ("layer2",), ("layer3",),
                                          ("layer4",)), ("avgpool", FLATTEN, "fc"))),
    (r"(vgg|mobilenet_v3|efficientnet)", ("features", ("avgpool", FLATTEN, "classifier"))),
    (r"convnext", ("features", ("avgpool", "classifier"))),
)


class StagedTorchvision(StagedNet):
    """A torchvision classifier run as `stages` (each a tuple of module paths, or the head's steps); `stages`
    None runs the builder's own forward as one stage. Its children are the torchvision model's own, so
    parameter names are unchanged and `functional_call` reaches them either way."""

    def __init__(self, net: nn.Module, stages: list[tuple[str, ...]] | None, domain: Domain):
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)
        for name, tensor in net.named_parameters(recurse=False):  # ViT's class token: kept in the state dict
            self.register_parameter(name, tensor)
        self.domain = domain
        self._whole = [net]  # a list, so the module is not registered twice: its forward is the one-stage path
        self.stages = stages or [(WHOLE,)]
        self.stage_names = tuple(self._stage_name(index, stage) for index, stage in enumerate(self.stages))

    def _stage_name(self, index: int, stage: tuple[str, ...]) -> str:
        """One module: its path; the first of several: 'stem'; a head: its last module with weights (an
        editable prefix: 'fc', 'classifier'); the builder's whole forward: 'model'."""
        if stage == (WHOLE,):
            return "model"
        if len(stage) == 1:
            return stage[0]
        if index == 0:
            return "stem"
        return [p for p in stage if p != FLATTEN and next(self.get_submodule(p).parameters(), None) is not None][-1]

    @property
    def staged(self) -> bool:
        return self.stages != [(WHOLE,)]

    def forward(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        for stage in self.stages[start:end]:
            for step in stage:
                if step == WHOLE:
                    x = self._whole[0](x)
                elif step == FLATTEN:
                    x = torch.flatten(x, 1)
                else:
                    x = self.get_submodule(step)(x)
        return x

    def first_stage_of(self, param_names) -> int:
        for index, stage in enumerate(self.stages):
            if stage == (WHOLE,) or any(n.startswith(p + ".") for n in param_names for p in stage):
                return index
        raise ValueError(f"none of {list(param_names)[:3]}... belongs to a stage of {self.stage_names}")


def builder_names() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)


def stages_for(builder: str, net: nn.Module) -> list[tuple[str, ...]] | None:
    """The builder's stages when its family is a known chain (`STAGED_FAMILIES`), else None (one stage)."""
    for pattern, (body, head) in STAGED_FAMILIES:
        if re.match(pattern, builder):
            if body == "features":
                body = [(f"features.{name}",) for name, _ in net.features.named_children()]
            return [*body, head]
    return None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors file or a .pth / .pt state dict (tensors only: never unpickles objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    elif path.suffix in (".pth", ".pt"):
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(f"{path} holds pickled objects other than tensors ({reason}); EditLab reads .pth files "
                             "only with torch.load(weights_only=True). Save a plain state dict "
                             "(torch.save(model.state_dict(), ...)) or convert it to safetensors.") from None
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise ValueError(f"{path} is not a readable torch state dict: {type(exc).__name__}: {exc}") from None
        if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
            tensors = tensors["state_dict"]  # a training checkpoint's weights
    else:
        raise ValueError(f"weights file {path} must be .safetensors, .pth or .pt")
    if not isinstance(tensors, dict) or not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    if all(name.startswith("module.") for name in tensors):  # saved from DataParallel
        tensors = {name[len("module."):]: value for name, value in tensors.items()}
    return tensors


def check_fit(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """ValueError naming the first missing, unexpected and wrongly shaped keys, if the weights do not fit."""
    expected = model.state_dict()
    # Batch norm's step counter is not used in eval mode, and older weights files lack it: it never decides a fit.
    counter = "num_batches_tracked"
    missing = [k for k in expected if k not in tensors and not k.endswith(counter)]
    unexpected = [k for k in tensors if k not in expected and not k.endswith(counter)]
    shapes = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    if problems:
        raise ValueError(f"the weights in {path.name} do not fit {arch}: " + "; ".join(problems))


def class_count(builder: str, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """(classes, key): the rows of the weights of the architecture's last linear layer."""
    from torchvision.models import get_model

    with torch.device("meta"):  # the layout only: no memory, no initialisation
        probe = get_model(builder, weights=None)
    linears = [name for name, module in probe.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision {builder} has no linear classifier, so EditLab cannot tell its class count")
    key = linears[-1] + ".weight"
    if key not in tensors:
        raise ValueError(f"the weights have no {key} (the last linear layer of torchvision {builder}); "
                         f"first keys: {', '.join(list(tensors)[:3])}")
    return int(tensors[key].shape[0]), key


def weights_domain(weights_enum: str) -> Domain:
    """Classes and preprocessing from a torchvision weights enum, e.g. 'ResNet18_Weights.IMAGENET1K_V1'."""
    from torchvision.models import get_weight

    try:
        weights = get_weight(weights_enum)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"unknown torchvision weights enum {weights_enum!r} (e.g. ResNet18_Weights.IMAGENET1K_V1): "
                         f"{exc}") from None
    transform = weights.transforms()
    return Domain(tuple(weights.meta["categories"]), int(transform.crop_size[0]), int(transform.resize_size[0]),
                  tuple(transform.mean), tuple(transform.std), transform.interpolation.value)


def default_layers(model: StagedTorchvision) -> tuple[str, str]:
    """(gradient editors' prefix, the local editor's conv): the stage before the last one with weights, and its
    first conv; for a one-stage model the conv three quarters of the way in, for both."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)] or weight_layer_names(model)
    if not model.staged:
        layer = convs[(3 * len(convs)) // 4]
        return layer, layer
    inside = lambda name, stage: any(name == p or name.startswith(p + ".") for p in stage)  # noqa: E731
    with_weights = [s for s, stage in zip(model.stage_names, model.stages) if any(inside(n, stage) for n in convs)]
    stage = with_weights[-2] if len(with_weights) > 1 else with_weights[-1]
    index = model.stage_names.index(stage)
    first_conv = next(n for n in convs if inside(n, model.stages[index]))
    return stage, first_conv


def load_model(spec: str, weights: str | Path, classes: tuple[str, ...] | None = None, weights_enum: str | None = None,
               preprocessing: dict | None = None, device: torch.device | str = "cpu") -> Checkpoint:
    """A torchvision classifier with its weights, as a Checkpoint whose model is a `StagedTorchvision`.

    spec: 'torchvision:<builder>'. Class names: `classes` (a class file), else the weights enum's categories;
    their count must be the weights'. Preprocessing: the weights enum's, else `preprocessing` (flags: a Domain's
    size, resize, mean, std, interpolation). Raises
    ValueError / FileNotFoundError with the reason; nothing is kept of a model that does not load."""
    if not spec.startswith(PREFIX):
        raise ValueError(f"model must be 'torchvision:<architecture>' (e.g. torchvision:resnet18), got {spec!r}")
    builder = spec[len(PREFIX):]
    if builder not in builder_names():
        near = [n for n in builder_names() if n.startswith(builder[:3])][:8]
        raise ValueError(f"torchvision has no classification architecture {builder!r}"
                         + (f" (similar: {', '.join(near)})" if near else ""))
    path = Path(weights)
    tensors = read_weights(path)
    n_classes, key = class_count(builder, tensors)
    named = weights_domain(weights_enum) if weights_enum else None
    if named is None and preprocessing is None:
        raise ValueError("say how images are preprocessed: name a torchvision weights enum or give the image size, "
                         "resize, mean and std")
    names = classes or (named.classes if named else None)
    if names is None:
        raise ValueError(f"the weights have {n_classes} classes: give their names (a class file, or class folders)")
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names but the weights have {n_classes} classes ({key} has "
                         f"{n_classes} rows)")
    from torchvision.models import get_model

    net = get_model(builder, weights=None, num_classes=n_classes)
    check_fit(net, tensors, path, f"torchvision {builder} with {n_classes} classes")
    net.load_state_dict(tensors, strict=False)  # check_fit let only batch norm's step counters differ
    the_domain = named.with_classes(names) if named else Domain(tuple(names), **preprocessing)
    model = StagedTorchvision(net, stages_for(builder, net), the_domain)
    note = None
    if model.staged and not chain_matches(model, net):
        model, note = StagedTorchvision(net, None, the_domain), "its stages did not reproduce its forward pass"
    model = model.to(device).eval()
    prefix, local_layer = default_layers(model)
    card = {
        "arch": spec,
        "model_source": "torchvision",
        "weights_enum": weights_enum,
        "run_as": (run_as(model) if model.staged else "one stage: every held-out re-evaluation is a full forward pass"
                   + (f" ({note})" if note else "")),
        "source": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "classes": list(names),
        "num_classes": n_classes,
        "preprocessing": the_domain.preprocessing(),
        "params": sum(p.numel() for p in model.parameters()),
        "editable_prefix": prefix,
        "local_layer": local_layer,
    }
    return Checkpoint(model, None, card)


def run_as(model: StagedNet) -> str:
    return f"a chain of {len(model.stage_names)} stages: {', '.join(model.stage_names)}"


@torch.no_grad()
def chain_matches(model: StagedTorchvision, net: nn.Module) -> bool:
    """Whether running the stages gives the builder's own forward pass (on two random images)."""
    x = torch.randn(2, *model.domain.shape, generator=torch.Generator().manual_seed(0))
    net.eval()
    return torch.allclose(model(x), net(x), rtol=1e-4, atol=1e-5)
