"""``callbacks.EMA`` on a LightningModule that has nothing to do with flowrl: a small classifier.

The average is kept in float32 beside the model, swapped in for validation (``swap_for_validation``) and saved
in the checkpoint; ``ema.swapped(model)`` gives the averaged weights anywhere else.

    python examples/ema_classifier.py
"""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import EMA


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def two_moons(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * torch.pi
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.stack([torch.cos(t) + y * 1.0, torch.sin(t) * (1 - 2 * y) + 0.3 * y], 1)
    return TensorDataset(x + 0.1 * torch.randn(x.shape, generator=g), y)


def main(epochs=5):
    torch.manual_seed(0)
    model, ema = Classifier(), EMA(ema_decay=0.9, ema_device="cpu", swap_for_validation=True)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[ema], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(two_moons(512, 0), batch_size=32, shuffle=True),
                DataLoader(two_moons(256, 1), batch_size=256))
    with ema.swapped(model):  # the averaged weights inside, the live weights back afterwards
        averaged = [p.detach().clone() for p in model.parameters()]
    return model, ema, averaged, float(trainer.callback_metrics["val_acc"])


if __name__ == "__main__":
    _, _, _, acc = main()
    print(f"validation accuracy with the EMA weights: {acc:.3f}")
