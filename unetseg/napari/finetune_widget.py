"""The Fine-tune dock widget (a magicgui container), contributed by `napari.yaml`.

Correct a labels layer, pair it with its image (the whole image or a crop), and train the current model
on the pairs for a set time in a worker with the project's own training, watching the loss; the new
model replaces the old one in the Segment widget (`unetseg.napari.widgets`), which predicts again, and
can be saved as a checkpoint or a bioimage.io package.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from napari.viewer import Viewer
from qtpy.QtCore import QObject, Signal

from unetseg.napari.models import LoadedModel, session
from unetseg.napari.predict import LayerInput
from unetseg.napari.widgets import LEARNING_RATES, _Workers, layers_of, training

if TYPE_CHECKING:
    from unetseg.napari.finetune import FineTuneSettings

__all__ = ["FineTuneWidget"]

log = logging.getLogger(__name__)


class _Readout(QObject):
    """Carries the training loss from the worker thread to the widget (a queued Qt connection)."""

    loss = Signal(int, float, float)


class FineTuneWidget(Container):
    """Fine-tune the viewer's current model (chosen in the Segment widget) on corrected labels.

    Pairs of an image layer and a labels layer (the whole image, its planes, or a crop placed by the
    labels layer's translate) train the model for a set time in a worker with unetseg's training
    (`unetseg.napari.finetune.fine_tune`), the loss shown as it goes; the fine-tuned model then
    replaces the current one and the Segment widget predicts again. Save it as a checkpoint (.ckpt) or
    a bioimage.io package (.zip).
    """

    def __init__(self, napari_viewer: Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session(napari_viewer)
        self.workers = _Workers()
        self.training: Any = None
        self.pairs: list[tuple[Any, Any]] = []
        self.losses: list[tuple[int, float, float]] = []  # (step, loss, seconds) of the last fine-tuning
        self._stop = threading.Event()
        self._readout = _Readout()
        self._readout.loss.connect(self._show_loss)
        self.image = ComboBox(label="image", choices=lambda _: layers_of(self.viewer, Image), nullable=True)
        self.labels = ComboBox(label="labels", choices=lambda _: layers_of(self.viewer, Labels), nullable=True)
        self.add_pair = PushButton(text="Add pair")
        self.clear_pairs = PushButton(text="Clear pairs")
        self.pairs_info = Label(label="pairs", value="the image and labels above")
        self.seconds = SpinBox(label="seconds", min=1, max=7 * 24 * 3600, value=60)
        self.lr = ComboBox(label="learning rate", choices=LEARNING_RATES, value=1e-3)
        self.tile_size = SpinBox(label="tile size", min=16, max=1024, step=16, value=128)
        self.train_button = PushButton(text="Fine-tune")
        self.cancel_button = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(label="time", min=0, max=60, value=0)
        self.loss = Label(label="loss", value="")
        self.checkpoint_path = FileEdit(label="checkpoint", mode="w", filter="*.ckpt")
        self.save_checkpoint_button = PushButton(text="Save checkpoint")
        self.package_path = FileEdit(label="bioimage.io", mode="w", filter="*.zip")
        self.save_package_button = PushButton(text="Save bioimage.io package")
        self.status = Label(label="status", value="")
        self.extend(
            [
                self.image,
                self.labels,
                Container(widgets=[self.add_pair, self.clear_pairs], layout="horizontal", labels=False),
                self.pairs_info,
                self.seconds,
                self.lr,
                self.tile_size,
                self.train_button,
                self.cancel_button,
                self.progress,
                self.loss,
                self.checkpoint_path,
                self.save_checkpoint_button,
                self.package_path,
                self.save_package_button,
                self.status,
            ]
        )
        self.add_pair.clicked.connect(self.add_current_pair)
        self.clear_pairs.clicked.connect(self.clear)
        self.train_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_checkpoint_button.clicked.connect(lambda: self.save(self.checkpoint_path.value, "save_model"))
        self.save_package_button.clicked.connect(lambda: self.save(self.package_path.value, "save_package"))
        self.reset_choices()

    @property
    def busy(self) -> bool:
        """True while fine-tuning or saving runs."""
        return self.workers.busy

    def add_current_pair(self) -> None:
        """Add the image and labels chosen above to the training pairs."""
        if self.image.value is None or self.labels.value is None:
            self._say("choose an image and a labels layer")
            return
        self.pairs.append((self.image.value, self.labels.value))
        self._show_pairs()

    def clear(self) -> None:
        self.pairs = []
        self._show_pairs()

    def _show_pairs(self) -> None:
        names = [f"{image.name} + {labels.name}" for image, labels in self.pairs]
        self.pairs_info.value = "; ".join(names) or "the image and labels above"

    def training_pairs(self) -> list[tuple[Any, Any]]:
        """The pairs added, else the image and labels chosen above."""
        if self.pairs:
            return list(self.pairs)
        if self.image.value is None or self.labels.value is None:
            raise ValueError("choose an image and a labels layer (the corrected one), or add pairs")
        return [(self.image.value, self.labels.value)]

    def run(self) -> None:
        """Fine-tune the current model on the pairs in a thread worker."""
        model = self.session.model
        try:
            if self.training is not None:
                raise ValueError("fine-tuning is running")
            if model is None:
                raise ValueError("no model loaded: choose one in the Segment widget")
            settings = training().FineTuneSettings(
                seconds=float(self.seconds.value), lr=float(self.lr.value), tile_size=int(self.tile_size.value)
            )
            pairs = [(LayerInput.of(image), LayerInput.of(labels)) for image, labels in self.training_pairs()]
        except ValueError as error:
            self._say(str(error))
            return
        for _, labels in self.training_pairs():
            self.session.corrections.add(labels)  # predictions now go to new layers, never over corrections
        self._stop.clear()
        self.losses = []
        self.progress.max, self.progress.value = max(1, int(settings.seconds)), 0
        self.train_button.enabled, self.cancel_button.enabled = False, True
        self._say(f"fine-tuning {model.description} for {settings.seconds:.0f} s...")
        worker = create_worker(self._train, model, pairs, settings, _start_thread=False)
        worker.finished.connect(self._training_finished)
        self.training = self.workers.start(worker, returned=self._trained, errored=self._failed)

    def _train(self, model: LoadedModel, pairs: list, settings: FineTuneSettings) -> LoadedModel:
        """The worker's job: samples of every pair, then `fine_tune`."""
        finetune = training()
        samples = [
            sample
            for image, labels in pairs
            for sample in finetune.layer_samples(image, labels, model, settings.tile_size)
        ]
        return finetune.fine_tune(model, samples, settings, report=self._readout.loss.emit, stop=self._stop)

    def cancel(self) -> None:
        """Stop fine-tuning after the current step; the model trained so far is kept."""
        self._stop.set()

    def _show_loss(self, step: int, loss: float, seconds: float) -> None:
        self.losses.append((step, loss, seconds))
        self.loss.value = f"{loss:.4f} (step {step}, {seconds:.0f} s)"
        self.progress.value = min(self.progress.max, int(seconds))

    def _trained(self, model: LoadedModel) -> None:
        self._say(f"{model.description}: now the current model")
        self.session.set(model)

    def _training_finished(self) -> None:
        self.training = None
        self.train_button.enabled, self.cancel_button.enabled = True, False

    def save(self, path: Any, writer: str) -> None:
        """Save the current model to `path` in a worker, with `writer`: "save_model" (a checkpoint) or
        "save_package" (a bioimage.io package) of `unetseg.napari.finetune`."""
        model = self.session.model
        if model is None or path is None or Path(path).is_dir() or str(path) in ("", "."):
            self._say("fine-tune or load a model, and choose where to save it")
            return
        self._say(f"saving {Path(path).name}...")
        worker = create_worker(getattr(training(), writer), model, Path(path), _start_thread=False)
        self.workers.start(worker, returned=lambda written: self._say(f"saved {written}"), errored=self._failed)

    def _failed(self, error: Exception) -> None:
        self._say(f"error: {error}")
        show_error(f"unetseg: {error}")

    def _say(self, text: str) -> None:
        self.status.value = text
        log.info("%s", text)
