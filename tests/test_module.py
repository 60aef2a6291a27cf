"""SegmentationModule: classes, loss, metrics, optimisers, the network description and checkpoints."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from unetseg.models import SMPUnet, UNet, build_net, describe_net
from unetseg.training.callbacks import plot_curves, read_metrics
from unetseg.training.data import SegmentationDataModule
from unetseg.training.module import SegmentationModule


def tiny_unet(**kwargs):
    return UNet(**{"depth": 2, "width": 4, **kwargs})


def batch(classes=1, size=16, count=2):
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(count, 1, size, size, generator=generator),
        "target": torch.randint(0, max(classes, 2), (count, size, size), generator=generator),
    }


def test_classes_come_from_the_network():
    assert SegmentationModule(tiny_unet(classes=3)).classes == 3
    assert SegmentationModule(nn.Conv2d(2, 4, 3, padding=1)).classes == 4  # inferred with a forward pass


def test_bad_scheduler_lists_the_choices():
    with pytest.raises(ValueError, match="scheduler='step' is not valid; choose one of 'cosine', 'plateau', 'none'"):
        SegmentationModule(tiny_unet(), scheduler="step")


def test_describe_and_build_net_round_trip():
    net = tiny_unet(in_channels=3, classes=2, skip="add", block="residual")
    description = describe_net(net)
    assert description == {"class_path": "unetseg.models.unet.UNet", "init_args": net.config}
    rebuilt = build_net(description)
    assert isinstance(rebuilt, UNet) and rebuilt.config == net.config
    smp_description = describe_net(SMPUnet(encoder_name="resnet18", encoder_depth=3))
    assert smp_description["class_path"] == "unetseg.models.baseline.SMPUnet"
    assert build_net(smp_description).config == smp_description["init_args"]


@pytest.mark.parametrize("class_path", ["os.system", "collections.OrderedDict", "unetseg.models.unet.NoSuchNet"])
def test_build_net_only_builds_modules(class_path):
    with pytest.raises(ValueError, match=f"{class_path} is not a torch.nn.Module class"):
        build_net({"class_path": class_path, "init_args": {}})


def test_hparams_describe_the_net_but_do_not_hold_it():
    module = SegmentationModule(tiny_unet(), lr=0.02)
    assert module.hparams["lr"] == 0.02
    assert module.hparams["net"]["init_args"]["width"] == 4
    assert all(not isinstance(value, nn.Module) for value in module.hparams.values())


@pytest.mark.parametrize("classes", [1, 3])
def test_training_step_gives_a_finite_loss_with_gradients(classes):
    module = SegmentationModule(tiny_unet(classes=classes))
    loss = module.training_step(batch(classes), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert module.net.head.weight.grad.abs().sum() > 0


def test_validation_dice_of_a_perfect_predictor_is_one():
    class Echo(nn.Module):
        """Logits +-10 from the first input channel: predicts the target when image == target."""

        classes = 1

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(20.0))

        def forward(self, image):
            return (image[:, :1] - 0.5) * self.scale

    module = SegmentationModule(Echo())
    module.log = lambda *args, **kwargs: None
    module.log_dict = lambda *args, **kwargs: None
    data = batch()
    data["image"] = data["target"][:, None].float()
    module.validation_step(data, 0)
    scores = module.val_metrics.compute()
    assert scores["val/dice"] == pytest.approx(1.0) and scores["val/iou"] == pytest.approx(1.0)


class Constant(nn.Module):
    """Returns fixed logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, image):
        return self.logits


def test_multiclass_validation_scores_foreground_and_classes():
    module = SegmentationModule(tiny_unet(classes=3))
    assert module.val_class_dice is not None
    target = torch.tensor([[[0, 1], [2, 2]]])
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 10
    module.net = Constant(logits)
    module.log = lambda *args, **kwargs: None
    module.validation_step({"image": torch.zeros(1, 1, 2, 2), "target": target}, 0)
    assert module.val_metrics.compute()["val/dice"] == pytest.approx(1.0)
    assert module.val_class_dice.compute() == pytest.approx(1.0)


@pytest.mark.parametrize("scheduler, kind", [("plateau", torch.optim.lr_scheduler.ReduceLROnPlateau), ("none", None)])
def test_optimisers(scheduler, kind):
    module = SegmentationModule(tiny_unet(), lr=0.05, weight_decay=0.01, scheduler=scheduler)
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["weight_decay"] == 0.01
    if kind is None:
        assert not isinstance(configured, dict)
    else:
        assert isinstance(configured["lr_scheduler"]["scheduler"], kind)
        assert configured["lr_scheduler"]["monitor"] == "val/dice"


def test_read_metrics_and_plot_curves(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/loss_step,val/dice\n0,1,0.9,\n0,1,,0.4\n1,3,0.5,\n1,3,,0.7\n")
    series = read_metrics(csv_path)
    assert series == {"train/loss_step": [(1, 0.9), (3, 0.5)], "val/dice": [(1, 0.4), (3, 0.7)]}
    out = plot_curves(csv_path, tmp_path / "curves.png")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CL = torch.channels_last


def test_checkpoint_from_a_python_fit_loads(shared_dataset, tmp_path):
    data = SegmentationDataModule(
        root=str(shared_dataset), tile_size=32, batch_size=2, tiles_per_epoch=2, num_workers=0
    )
    trainer = pl.Trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )
    module = SegmentationModule(tiny_unet())
    conv = module.net.down[0][1].body[0].weight  # (8, 4, 3, 3): its layout is not trivially both
    assert not conv.is_contiguous(memory_format=CL)
    trainer.fit(module, data)
    assert module.net.down[0][1].body[0].weight.is_contiguous(memory_format=CL)  # trained NHWC on the CPU
    model = SegmentationModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert model.hparams["input_spec"]["normalization"] == {"low": 1.0, "high": 99.8, "clip": True}


def test_deep_supervision_trains_on_every_head():
    torch.manual_seed(0)
    net = UNet(in_channels=1, classes=1, depth=2, width=4, skip="nested", deep_supervision=True)
    module = SegmentationModule(net)
    batch = {"image": torch.rand(2, 1, 32, 32), "target": (torch.rand(2, 32, 32) > 0.5).long()}
    net.train()
    heads = net(batch["image"])
    assert isinstance(heads, (list, tuple)) and len(heads) == 2
    loss = module.training_step(batch, 0)
    expected = torch.stack([module.loss(logits, batch["target"]) for logits in heads]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
