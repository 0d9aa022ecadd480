"""Your own classifier and images: a torchvision model + an ImageFolder, through the library, the page's handlers,
gradio_client and app.py's refusals; and the embedded sample as a PNG folder giving the native path's numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from app import Handlers
from editcore import (CLASSES, DataError, EditSettings, ImageRef, Lab, folder_class_names, load_checkpoint, load_sample,
                      load_train_sample, open_folder_setup, read_weights)

ROOT = Path(__file__).resolve().parent.parent
CLASS_NAMES = ("cat", "dog", "fox")
SIZE = 16  # the tiny model's images: every picture is resized (shorter side 18) and centre-cropped to this
PREPROCESSING = {"size": SIZE, "resize": 18, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                 "interpolation": "bilinear"}


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    """An ImageFolder of random pictures of assorted sizes and formats (PNG, JPEG, grey, RGBA)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASS_NAMES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (20 + 3 * i, 24 + 2 * label, 3), dtype=np.uint8)
            pixels[..., label] //= 3  # a little class signal
            image = Image.fromarray(pixels)
            if i % 4 == 1:
                image.convert("L").save(root / name / f"{i}.png")
            elif i % 4 == 2:
                image.convert("RGBA").save(root / name / f"{i}.png")
            else:
                image.save(root / name / f"{i}.{'jpg' if i % 4 == 3 else 'png'}")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny torchvision model's weights (ResNet-18, random init, 3 classes) and an ImageFolder with one corrupt
    file and one text file among its images."""
    folder = tmp_path_factory.mktemp("own")
    images = write_folder(folder / "images", 10, 0)
    (images / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (images / "dog" / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    from torchvision.models import resnet18

    net = resnet18(num_classes=len(CLASS_NAMES)).eval()
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    return SimpleNamespace(folder=folder, images=images, weights=weights, net=net)


@pytest.fixture(scope="module")
def setup(files):
    return open_folder_setup("torchvision:resnet18", files.weights, files.images, preprocessing=PREPROCESSING)


@pytest.fixture(scope="module")
def handlers(setup):
    return Handlers(Lab.load_folder(setup, log=lambda *_: None))


def request(name: str):
    return SimpleNamespace(session_hash=name)


def test_the_folder_the_model_and_the_card(files, setup):
    card, model = setup.checkpoint.card, setup.checkpoint.model
    assert folder_class_names(files.images) == CLASS_NAMES and model.domain.classes == CLASS_NAMES
    assert model.domain.shape == (3, SIZE, SIZE) and setup.heldout.images.shape[1:] == (3, SIZE, SIZE)
    assert len(setup.heldout) + len(setup.anchors) == 30  # 2 of 32 files skipped
    assert any("2 file(s)" in note and "skipped" in note for note in setup.notes)
    assert any("6 of the 30 images" in note for note in setup.notes)  # the seeded 20% anchor share
    held = {int(i) for i in setup.heldout.indices}
    assert held.isdisjoint(int(i) for i in setup.anchors.indices)  # anchors are never scored as held-out
    assert card["sha256"] and card["classes"] == list(CLASS_NAMES) and card["num_classes"] == 3
    assert card["preprocessing"]["size"] == SIZE and card["run_as"].startswith("a chain of 6 stages")
    assert (card["editable_prefix"], card["local_layer"]) == ("layer3", "layer3.0.conv1")
    with torch.no_grad():  # staged as it is, the model is the torchvision model
        x = torch.randn(2, 3, SIZE, SIZE)
        assert torch.allclose(model(x), files.net(x), atol=1e-5)
        assert torch.equal(model(model(x, end=3), start=3), model(x))


def test_load_browse_select_edit_undo_export_replay_through_the_handlers(handlers, files, setup):
    r = request("own1")
    model, lr, max_steps, layers, image, target, report, *_, gallery, page = handlers.on_load(r)
    assert model["value"] == "resnet18" and layers["value"] == "layer3.0.conv1"
    assert "layer4.1.conv2" in layers["choices"] and "fc" in layers["choices"]  # the layer list is the model's
    assert target in CLASS_NAMES
    width, height = Image.open(image).size  # the picture as it is on disk, then what the model sees (16 px x 16)
    assert height == 256 and width > 256 + 8
    _, info, topk, target = handlers.select_image("test", 0, r)
    assert "Image #0" in info and set(topk) == set(CLASS_NAMES)
    wrong = next(name for name in CLASS_NAMES if name != max(topk, key=topk.get))
    outputs = handlers.apply_edit(wrong, "resnet18", None, None, None, None, 0, r)  # the local editor
    assert outputs[0]["applied"] and outputs[0]["layers"] == "layer3.0.conv1" and outputs[0]["targets"] == [wrong]
    assert max(outputs[2], key=outputs[2].get) == wrong and outputs[0]["n_heldout"] == len(setup.heldout) - 1
    assert outputs[5].count("<figure>") == 16  # the augmented views of a 16 px image
    assert handlers.undo(r)[0]["edits"] == 0 and handlers.history(r) == []

    handlers.reset(r)  # a gradient editor on a parameter prefix
    report = handlers.apply_edit(wrong, "resnet18", "rmsprop", 1e-3, 50, "layer4", 0, r)[0]
    assert report["applied"] and report["layers"] == "layer4"
    weights, card = handlers.export_weights(r)["value"]
    assert json.loads(Path(card).read_text())["edits"][0]["targets"] == [wrong]
    with pytest.raises(ValueError, match="--model torchvision:resnet18 --weights"):
        load_checkpoint(weights)  # not an editcore architecture: the message says how to open it
    exported = open_folder_setup("torchvision:resnet18", weights, files.images)  # classes, preprocessing: its card's
    assert exported.checkpoint.model.domain == setup.checkpoint.model.domain
    assert exported.checkpoint.card["edits"][0]["targets"] == [wrong] and "edited_from" in exported.checkpoint.card
    session = handlers.workspace(r).session("resnet18")
    assert torch.equal(session.probabilities(setup.heldout.images).argmax(1),
                       Lab.load_folder(exported, log=lambda *_: None).models["resnet18"].base_heldout_probs.argmax(1))

    log_path, = handlers.export_log(r)["value"]
    other = request("own2")
    handlers.on_load(other)
    replayed = handlers.replay_log(log_path, other)
    assert replayed[1]["reproduced"] is True and len(handlers.history(other)) == 1


@pytest.mark.api
@pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # from gradio's queue
def test_edits_through_gradio_client(handlers):
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    from app_support import free_port
    from app.ui import launch

    demo, url = launch(handlers.lab, port=free_port(), block=False, quiet=True)
    try:
        client = Client(url, verbose=False, download_files=False)
        _, info, label, _ = client.predict("test", 3, api_name="/select_image")
        ranked = [c["label"] for c in label["confidences"]]
        assert "Image #3" in info and sorted(ranked) == sorted(CLASS_NAMES)
        report = client.predict(ranked[1], "resnet18", "local", None, None, None, 0, api_name="/apply_edit")[0]
        assert report["applied"] and report["targets"] == [ranked[1]]
        assert len(client.predict(api_name="/history")) == 1
        client.predict(api_name="/undo")
        assert client.predict(api_name="/history") == []
    finally:
        demo.close()


def test_a_builder_that_is_not_a_chain_runs_whole_and_says_so(files, tmp_path):
    from torchvision.models import mobilenet_v2

    weights = tmp_path / "mobilenet.pth"
    torch.save(mobilenet_v2(num_classes=3).state_dict(), weights)  # a plain state dict: weights_only reads it
    setup = open_folder_setup("torchvision:mobilenet_v2", weights, files.images, preprocessing=PREPROCESSING)
    assert not setup.checkpoint.model.staged and "full forward pass" in setup.checkpoint.card["run_as"]
    assert any("full forward pass" in note for note in setup.notes)
    lab = Lab.load_folder(setup, log=lambda *_: None)
    shared = lab.models["mobilenet_v2"]
    assert shared.layers_for("local") in shared.layer_choices and shared.model.stage_names == ("model",)
    ws = lab.registry.get("whole")
    ws.select(ImageRef("test", 1))
    target = (int(shared.base_heldout_probs[1].argmax()) + 1) % 3
    report = ws.apply("mobilenet_v2", target, EditSettings())
    assert report.success and report.applied
    with torch.no_grad():  # the cached "features" of a one-stage model are its inputs: the same predictions
        assert torch.equal(ws.session("mobilenet_v2").heldout_probs.argmax(1),
                           ws.session("mobilenet_v2").probabilities(setup.heldout.images).argmax(1))


def test_a_features_chain_is_staged_with_torchvision_names(tmp_path):
    from torchvision.models import mobilenet_v3_small

    from editcore import load_model

    torch.manual_seed(0)
    net = mobilenet_v3_small(num_classes=3).eval()
    weights = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    checkpoint = load_model("torchvision:mobilenet_v3_small", weights, CLASS_NAMES, preprocessing=PREPROCESSING)
    model = checkpoint.model
    assert model.staged and model.stage_names[-1] == "classifier" and model.stage_names[0] == "features.0"
    assert list(model.state_dict()) == list(net.state_dict())  # an export loads back into torchvision as it is
    assert checkpoint.card["editable_prefix"] == "features.11" and checkpoint.card["local_layer"].startswith("features.11.")
    with torch.no_grad():
        x = torch.randn(2, 3, SIZE, SIZE)
        assert torch.allclose(model(x), net(x), atol=1e-5)


def test_evaluate_edits_takes_the_same_flags(files, capsys):
    from editcore.cli import main

    own = ["--model", "torchvision:resnet18", "--weights", str(files.weights), "--image-size", str(SIZE), "--resize",
           "18", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    assert main(["evaluate-edits", *own, "--images", str(files.images), "--n-edits", "2", "--json", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["n_edits"], summary["n_heldout"], summary["layers"]) == (2, 24, "layer3.0.conv1")
    assert main(["evaluate-edits", *own, "--images", str(files.folder / "nowhere"), "--threads", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # The NAE protocol on your own natural adversarial examples: edits to their true labels, drawdown on --images.
    hard = write_folder(files.folder / "hard", 2, 1)
    assert main(["evaluate-edits", *own, "--images", str(files.images), "--protocol", "nae", "--nae-images", str(hard),
                 "--n-edits", "2", "--json", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["protocol"], summary["n_nae"], summary["n_heldout"], summary["targets"]) == ("nae", 6, 24, "true")


def test_a_measure_row_names_the_evaluate_edits_command_that_gives_its_numbers(handlers, capsys):
    import shlex

    from editcore import MeasureSettings, measure
    from editcore.cli import main

    row, = measure(handlers.lab.models, MeasureSettings(editors=("rmsprop",), n_edits=10), handlers.lab.sources["test"])
    argv = shlex.split(row.command)[3:]  # after 'python -m editcore'
    assert argv[:3] == ["evaluate-edits", "--model", "torchvision:resnet18"]
    assert main([*argv, "--json", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["drawdown"], summary["success_rate"]) == (row.summary["drawdown"], row.summary["success_rate"])


def run_app(*argv: str) -> int:
    spec = importlib.util.spec_from_file_location("app_py", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.limit_allocator_retention = lambda: None
    module.launch = pytest.fail  # a refusal must stop before anything is served
    return module.main(list(argv))


def test_bad_input_is_refused_with_status_2_and_a_message(files, tmp_path, capsys):
    from torchvision.models import resnet34

    size = ["--image-size", str(SIZE), "--resize", "18"]
    own = ["--model", "torchvision:resnet18", *size]
    cases = []
    cases.append(([*own, "--weights", str(files.weights), "--images", str(tmp_path / "nowhere")],
                  f"image folder {tmp_path / 'nowhere'} does not exist"))
    other = tmp_path / "resnet34.safetensors"
    save_file({k: v.contiguous() for k, v in resnet34(num_classes=3).state_dict().items()}, str(other))
    cases.append(([*own, "--weights", str(other), "--images", str(files.images)],
                  "do not fit torchvision resnet18 with 3 classes: unexpected: layer1.2.bn1.bias"))
    pickled = tmp_path / "pickled.pth"
    torch.save({"fc.weight": torch.zeros(3, 512), "note": SimpleNamespace(x=1)}, pickled)
    cases.append(([*own, "--weights", str(pickled), "--images", str(files.images)], "holds pickled objects"))
    four = tmp_path / "four.txt"
    four.write_text("cat\ndog\nfox\nowl\n")
    cases.append(([*own, "--weights", str(files.weights), "--images", str(files.images), "--classes", str(four)],
                  "4 class names but the weights have 3 classes"))
    cases.append((["--model", "torchvision:resnet18", "--images", str(files.images)], "--model needs --weights"))
    for argv, message in cases:
        assert run_app(*argv) == 2, argv
        assert message in capsys.readouterr().err
    assert read_weights(files.weights).keys() >= {"fc.weight", "layer3.0.conv1.weight"}


def test_a_class_folder_the_model_does_not_know_is_refused(files, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nowl\n")
    with pytest.raises(DataError, match="fox are not among the model's 3 class names"):
        open_folder_setup("torchvision:resnet18", files.weights, files.images, classes_file=names,
                          preprocessing=PREPROCESSING)


def export_png_folder(images, root: Path) -> Path:
    """An ImageSet as root/<CIFAR-10 class>/<row>.png (rows in order within a class)."""
    for row, (image, label) in enumerate(zip(images.images, images.labels)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{row:05d}.png")
    return root


@pytest.mark.slow
def test_the_sample_as_a_png_folder_gives_the_native_numbers(tmp_path, tmp_path_factory, request):
    """The shipped ResNet-20 through --model editcore:resnet20 on the embedded sample exported as PNGs (anchors: the
    shipped training sample, exported too) predicts, edits and scores as the native lab does."""
    from app_support import make_lab

    native = make_lab(tmp_path_factory, request)
    name = "baseline"
    sample, train = load_sample(), load_train_sample()
    setup = open_folder_setup("editcore:resnet20", native.models[name].path, export_png_folder(sample, tmp_path / "test"),
                              export_png_folder(train, tmp_path / "anchors"))
    assert setup.notes == ["resnet20 runs as a chain of 5 stages: stem, layer1, layer2, layer3, head"]
    own = Lab.load_folder(setup, name, log=lambda *_: None)
    # The folder's rows are sorted by class, then file: find each native row's image among them by its pixels.
    by_pixels = {image.numpy().tobytes(): row for row, image in enumerate(own.sources["test"].images)}
    order = [by_pixels[image.numpy().tobytes()] for image in sample.images]
    assert torch.equal(own.models[name].base_heldout_probs[order], native.models[name].base_heldout_probs)

    for editor, target_shift in (("local", 1), ("rmsprop", 3)):
        reports = []
        for lab, row in ((native, 5), (own, order[5])):
            ws = lab.registry.get(f"equivalence-{editor}")
            ws.select(ImageRef("test", row))
            target = (int(sample.labels[5]) + target_shift) % 10
            reports.append(ws.apply(name, target, EditSettings(editor=editor)).to_dict())
            lab.registry.drop(f"equivalence-{editor}")
        same = ("success", "applied", "steps", "heldout_accuracy_before", "heldout_accuracy_after", "n_heldout",
                "n_fixed", "n_broken", "targets", "views_at_target_after")
        assert {k: reports[0][k] for k in same} == {k: reports[1][k] for k in same}, editor
