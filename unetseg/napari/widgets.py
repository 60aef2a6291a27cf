"""The Segment dock widget (a magicgui container), contributed by `napari.yaml`, and what the Fine-tune widget
(`unetseg.napari.finetune_widget`) shares with it.

Segment: choose a model (a shipped one by name, a checkpoint, an ONNX file or a bioimage.io package) and
an image layer, press Run; the prediction runs in a napari thread worker (progress bar, Cancel) and its
labels and/or foreground probability land as layers with the image's scale and translate. Fine-tune:
correct a labels layer, pair it with its image (the whole image or a crop), and train the current model on
the pairs for a set time in a worker with the project's own training, watching the loss; the new model
replaces the old one in the Segment widget, which predicts again, and can be saved as a checkpoint or a
bioimage.io package. The two widgets of one viewer share the model (`unetseg.napari.models.session`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from napari.viewer import Viewer

from unetseg.inference.pipeline import PredictSettings
from unetseg.inference.tiling import TilingConfig
from unetseg.napari import avoid_llvm_clash
from unetseg.napari.models import MODEL_SUFFIXES, LoadedModel, load_model, model_choices, session
from unetseg.napari.predict import LayerInput, iter_layer_prediction

if TYPE_CHECKING:
    pass

__all__ = ["SegmentWidget"]

log = logging.getLogger(__name__)

FILE_CHOICE = "checkpoint or package file..."
OUTPUT_NAMES = {"labels": "labels", "prob": "probability"}
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def training() -> Any:
    """`unetseg.napari.finetune`, imported on first use: the training stack (Lightning, torchmetrics) is heavy,
    and must not bring triton into a process whose OpenGL driver loaded LLVM (`avoid_llvm_clash`)."""
    avoid_llvm_clash()
    from unetseg.napari import finetune

    return finetune


def layers_of(viewer: Viewer, kind: type) -> list[tuple[str, Any]]:
    """(name, layer) of the viewer's layers of one type, for a ComboBox."""
    return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, kind)]


class _Workers:
    """The thread workers a widget has running: `busy` while any is."""

    def __init__(self):
        self.running: set = set()

    def start(self, worker: Any, **handlers) -> Any:
        for signal, handler in handlers.items():
            getattr(worker, signal).connect(handler)
        self.running.add(worker)
        worker.finished.connect(lambda: self.running.discard(worker))
        worker.start()
        return worker

    @property
    def busy(self) -> bool:
        return bool(self.running)


class SegmentWidget(Container):
    """Segment an image layer with a unetseg model; outputs: labels and/or foreground probability layers.

    Post-processing (threshold, seed threshold, min size, TTA) starts at the values the model stores
    (tuned by unetseg-tune), else the defaults, whenever another model is chosen. A 2-D model predicts
    2-D and RGB layers, and the planes of stacks one by one; a 3-D model predicts 3-D layers with their
    scale as voxel size. Dask and multiscale layers are read tile by tile (the finest level).
    """

    def __init__(self, napari_viewer: Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session(napari_viewer)
        self.workers = _Workers()
        self.prediction: Any = None  # the running prediction's worker
        self.outputs: dict[str, Any] = {}  # kind -> the layer the last prediction wrote
        self._made: dict[tuple[int, str], Any] = {}  # (image layer id, kind) -> output layer, to update
        self._last_image: Any = None
        shipped = model_choices()
        current = self.session.model
        first = shipped[0] if shipped else FILE_CHOICE
        self.model = ComboBox(label="model", choices=[*shipped, FILE_CHOICE], value=first)
        self.model_file = FileEdit(label="model file", mode="r", filter=MODEL_SUFFIXES)
        self.model_info = Label(label="loaded", value="")
        self.image = ComboBox(label="image", choices=lambda _: layers_of(self.viewer, Image), nullable=True)
        self.labels_output = CheckBox(text="labels", value=True)
        self.prob_output = CheckBox(text="probability", value=False)
        outputs = Container(widgets=[self.labels_output, self.prob_output], layout="horizontal", labels=False)
        outputs.label = "outputs"
        self.threshold = FloatSpinBox(label="threshold", min=0.0, max=1.0, step=0.05, value=0.5)
        self.seed_threshold = FloatSpinBox(label="seed threshold", min=0.0, max=1.0, step=0.05, value=0.0)
        for spin in (self.threshold, self.seed_threshold):
            spin.native.setDecimals(4)  # stored thresholds keep their digits
        self.seed_threshold.native.setSpecialValueText("as threshold")  # 0: seeds at the threshold
        self.min_size = SpinBox(label="min size", min=0, max=10**9, value=15, tooltip="smallest object, pixels")
        self.tta = CheckBox(text="test-time augmentation (8 flips and turns)", value=False)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="status", value="")
        self.extend(
            [
                self.model,
                self.model_file,
                self.model_info,
                self.image,
                outputs,
                self.threshold,
                self.seed_threshold,
                self.min_size,
                self.tta,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
            ]
        )
        self.model_file.visible = self.model.value == FILE_CHOICE
        self.model.changed.connect(self._model_chosen)
        self.model_file.changed.connect(self._file_chosen)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.session.changed.connect(self._model_changed)
        self.reset_choices()
        if current is not None:  # the viewer's model (another Segment widget's, or a fine-tuned one)
            self._adopt(current)
        else:
            self.load()

    # --- the model --------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a model loads or a prediction runs."""
        return self.workers.busy

    def choice(self) -> str | None:
        """The chosen model: a shipped model's name or a model file's path; None when no file is chosen yet."""
        if self.model.value != FILE_CHOICE:
            return self.model.value
        path = self.model_file.value
        return str(path) if path is not None and Path(path).is_file() else None

    def _model_chosen(self) -> None:
        self.model_file.visible = self.model.value == FILE_CHOICE
        self.load()

    def _file_chosen(self) -> None:
        if self.model.value != FILE_CHOICE:
            self.model.value = FILE_CHOICE  # loads through _model_chosen
        else:
            self.load()

    def load(self) -> None:
        """Load the chosen model in a worker; its stored post-processing becomes the widget's settings."""
        choice = self.choice()
        if choice is None:
            self._say("choose a model file (.ckpt, .zip, .onnx)")
            return
        self.run_button.enabled = False
        self._say(f"loading {Path(choice).name}...")
        worker = create_worker(load_model, choice, _start_thread=False)
        self.workers.start(worker, returned=self._loaded, errored=self._failed)

    def _loaded(self, model: LoadedModel) -> None:
        if model.choice != self.choice():  # another model was chosen while this one loaded
            return
        self.session.set(model)

    def _model_changed(self, model: LoadedModel) -> None:
        """The viewer's model was replaced: by a new choice (take its settings) or by fine-tuning (predict again)."""
        self._adopt(model)
        image = self._last_image
        if model.tuned and image is not None and image in self.viewer.layers and self.prediction is None:
            self.image.value = image
            self.run()

    def _adopt(self, model: LoadedModel) -> None:
        """Show `model` as the loaded one; a newly chosen model's stored settings become the widget's."""
        if model.choice != self.choice():
            with self.model.changed.blocked(), self.model_file.changed.blocked():
                if model.choice in self.model.choices:
                    self.model.value = model.choice
                else:
                    self.model.value, self.model_file.value = FILE_CHOICE, model.choice
                self.model_file.visible = self.model.value == FILE_CHOICE
        if not model.tuned:
            defaults = model.label_defaults()
            self.threshold.value = defaults["threshold"]
            self.seed_threshold.value = defaults["seed_threshold"] or 0.0
            self.min_size.value = defaults["min_size"]
            self.tta.value = defaults["tta"]
        self.model_info.value = f"{model.description} ({model.dims}-D, {model.spec.targets}, {model.device})"
        self.run_button.enabled = True
        self._say("ready")

    # --- prediction -------------------------------------------------------------------------------------

    def settings(self) -> PredictSettings:
        """The prediction settings shown: outputs, threshold, seed threshold, min size and TTA."""
        kinds = tuple(kind for kind, box in (("labels", self.labels_output), ("prob", self.prob_output)) if box.value)
        if not kinds:
            raise ValueError("choose an output: labels, probability or both")
        return PredictSettings(
            output=kinds,
            threshold=float(self.threshold.value),
            seed_threshold=float(self.seed_threshold.value) or None,
            min_size=int(self.min_size.value),
            tiling=TilingConfig(tta=bool(self.tta.value)),
        )

    def run(self) -> None:
        """Predict the chosen image layer with the current model in a thread worker."""
        model, layer = self.session.current(self.choice() or ""), self.image.value
        try:
            if self.prediction is not None:
                raise ValueError("a prediction is running; cancel it first")
            if model is None:
                raise ValueError("no model loaded: choose one")
            if layer is None:
                raise ValueError("choose an image layer")
            settings, source = self.settings(), LayerInput.of(layer)
        except ValueError as error:
            self._say(str(error))
            return
        self._last_image = layer
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.progress.value = 0
        self._say(f"predicting {source.name}...")
        worker = create_worker(iter_layer_prediction, model, source, settings, _start_thread=False)
        worker.finished.connect(self._prediction_finished)
        self.prediction = self.workers.start(
            worker,
            yielded=self._progressed,
            returned=lambda outputs: self._show(layer, source, outputs),
            errored=self._failed,
            aborted=lambda: self._say("cancelled"),
        )

    def cancel(self) -> None:
        """Stop the running prediction after its current band."""
        if self.prediction is not None:
            self.prediction.quit()

    def _progressed(self, done_total: tuple[int, int]) -> None:
        done, total = done_total
        self.progress.max, self.progress.value = max(total, 1), done

    def _prediction_finished(self) -> None:
        self.prediction = None
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def _show(self, layer: Any, source: LayerInput, outputs: dict) -> None:
        """Put each output into the layer this widget made for it last time, or a new one, with the image's
        scale and translate; a labels layer being corrected for fine-tuning is never overwritten."""
        for kind, data in outputs.items():
            target = self._made.get((id(layer), kind))
            if target is None or target not in self.viewer.layers or target in self.session.corrections:
                name = f"{source.name} {OUTPUT_NAMES[kind]}"
                if kind == "labels":
                    target = self.viewer.add_labels(data, name=name, scale=source.scale, translate=source.translate)
                else:
                    target = self.viewer.add_image(
                        data,
                        name=name,
                        scale=source.scale,
                        translate=source.translate,
                        colormap="magma",
                        blending="additive",
                        contrast_limits=(0.0, 1.0),
                    )
            else:
                target.scale, target.translate = source.scale, source.translate
                target.data = data
            self._made[(id(layer), kind)] = target
            self.outputs[kind] = target
        objects = int(outputs["labels"].max()) if "labels" in outputs else None
        self._say(f"done: {objects} objects" if objects is not None else "done")

    def _failed(self, error: Exception) -> None:
        self._say(f"error: {error}")
        self.run_button.enabled = self.session.current(self.choice() or "") is not None
        show_error(f"unetseg: {error}")

    def _say(self, text: str) -> None:
        self.status.value = text
        log.info("%s", text)
