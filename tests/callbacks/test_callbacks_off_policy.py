"""callbacks.OffPolicySampling: rollouts come from the EMA weights, training uses the live weights."""

import contextlib

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import EMA, OffPolicySampling, enter_sampling_contexts

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*LeafSpec.*",
)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=False)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class SelfSampling(LightningModule):
    """Generates its own data each batch (a stand-in for RL rollouts), then takes an optimizer step."""

    def __init__(self, use_helper: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.automatic_optimization = False
        self.use_helper = use_helper
        self.records = []  # per batch: live before sampling, seen while sampling, EMA then, live after

    def _sampling(self):
        if self.use_helper:
            return enter_sampling_contexts(self.trainer, self)
        stack = contextlib.ExitStack()  # the protocol written out
        for cb in self.trainer.callbacks:
            if hasattr(cb, "sampling_context"):
                stack.enter_context(cb.sampling_context(self.trainer, self))
        return stack

    def training_step(self, batch, batch_idx):
        x, _ = batch
        ema = next((cb for cb in self.trainer.callbacks if isinstance(cb, EMA)), None)
        before = _snapshot(self)
        with self._sampling(), torch.no_grad():
            seen = _snapshot(self)
            targets = self.net(x) + 1.0  # "rollout": data made by the sampling policy
        after = _snapshot(self)
        avg = {k: v.clone() for k, v in ema.averaged_parameters.items()} if ema else None
        self.records.append((before, seen, avg, after))

        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.net(x), targets))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callbacks, model, max_steps=4):
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        callbacks=callbacks,
    )
    trainer.fit(model, _data())
    return trainer


@pytest.mark.parametrize("use_helper", [False, True])
def test_sampling_sees_ema_weights_and_live_weights_are_untouched(use_helper):
    model = SelfSampling(use_helper=use_helper)
    _fit([EMA(ema_decay=0.5), OffPolicySampling()], model)
    assert len(model.records) == 4
    for i, (before, seen, avg, after) in enumerate(model.records):
        for n in avg:
            assert torch.equal(seen[n], avg[n])  # sampled with the EMA weights
            assert torch.equal(after[n], before[n])  # the live weights are back, bit for bit
            if i > 0:  # after the first update the average lags the live weights
                assert not torch.equal(seen[n], before[n])
        assert seen.keys() == before.keys()
    # training used the live weights: the live trajectory is not the average
    assert not torch.equal(model.net.weight.detach(), model.records[-1][2]["net.weight"])


def test_off_policy_false_samples_with_live_weights():
    model = SelfSampling()
    _fit([EMA(ema_decay=0.5), OffPolicySampling(off_policy=False)], model)
    for before, seen, _, after in model.records:
        for n in before:
            assert torch.equal(seen[n], before[n]) and torch.equal(after[n], before[n])


def test_missing_ema_names_the_fix():
    with pytest.raises(
        RuntimeError, match="add callbacks.EMA to the trainer callbacks, or set off_policy: false"
    ):
        _fit([OffPolicySampling()], SelfSampling())


def test_missing_ema_is_fine_when_off_policy_is_false():
    model = SelfSampling()
    _fit([OffPolicySampling(off_policy=False)], model, max_steps=1)
    assert len(model.records) == 1


def test_two_emas_are_ambiguous():
    class FakeTrainer:  # Lightning itself already refuses two EMA callbacks (same state_key)
        callbacks = [EMA(), EMA()]

    with pytest.raises(RuntimeError, match="single callbacks.EMA"):
        OffPolicySampling().setup(FakeTrainer(), None, "fit")


def test_enter_sampling_contexts_enters_every_participating_callback_in_order():
    events = []

    class Probe(Callback):
        def __init__(self, name):
            self.name = name

        @contextlib.contextmanager
        def sampling_context(self, trainer, pl_module):
            events.append(f"enter {self.name}")
            yield
            events.append(f"exit {self.name}")

    class FakeTrainer:
        callbacks = [Probe("a"), Callback(), Probe("b")]

    with enter_sampling_contexts(FakeTrainer(), None):
        events.append("sample")
    assert events == ["enter a", "enter b", "sample", "exit b", "exit a"]
    with enter_sampling_contexts(None, None):  # no trainer: null context
        pass
