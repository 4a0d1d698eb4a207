"""The model of HyperAggregate's MNIST benchmark, as a LightningModule."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR


class MNISTNet(nn.Module):
    """PyTorch's MNIST example network (the original benchmark's ``MNISTNet``).

    conv 1->32 3x3, conv 32->64 3x3, 2x2 max-pool, dropout 0.25, fc 9216->128,
    dropout 0.5, fc 128->10, log-softmax.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class LitMNIST(pl.LightningModule):
    """Training as in the original: Adadelta (lr 1.0), StepLR (gamma 0.7) per epoch, NLL loss.

    Validation runs on the test set and logs ``val_loss`` and ``val_acc`` (a
    fraction in [0, 1]). With ``aggregation_only=True`` nothing is trained: the
    training step is a no-op and only the aggregation rounds run.
    """

    def __init__(self, lr: float = 1.0, gamma: float = 0.7, aggregation_only: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MNISTNet()
        self.automatic_optimization = not aggregation_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        if self.hparams.aggregation_only:
            return None
        images, labels = batch
        loss = F.nll_loss(self(images), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        output = self(images)
        loss = F.nll_loss(output, labels)
        acc = (output.argmax(dim=1) == labels).float().mean()
        self.log("val_loss", loss, batch_size=len(labels))
        self.log("val_acc", acc, prog_bar=True, batch_size=len(labels))

    def configure_optimizers(self):  # type: ignore[override]
        optimizer = torch.optim.Adadelta(self.parameters(), lr=self.hparams.lr)
        scheduler = StepLR(optimizer, step_size=1, gamma=self.hparams.gamma)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> float:
    """Accuracy (fraction) of ``model`` on ``loader``, restoring its train/eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        correct += int((model(images).argmax(dim=1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)
