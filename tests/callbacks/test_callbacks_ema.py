"""callbacks.EMA on plain Lightning modules that have nothing to do with flowrl."""

import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import EMA, EMA_DECAY_SCHEDULES, decay_at

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*LeafSpec.*",
    "ignore:.*no `val_dataloader`.*",
    "ignore:.*callbacks used to create the checkpoint.*",
    "ignore:.*checkpoint that ended before the epoch ended.*",
)


# ---------------------------------------------------------------------------- decay schedules
@pytest.mark.parametrize(
    "schedule, step, kwargs, expected",
    [
        ("constant", 0, {}, 0.9),
        ("constant", 1, {}, 0.9),
        ("constant", 500, {}, 0.9),
        # power: min(d, (1 + step) / (W + step)), W = 10
        ("power", 0, {}, 0.1),
        ("power", 1, {}, 2 / 11),
        ("power", 5, {}, 6 / 15),
        ("power", 80, {}, 0.9),  # 81/90 = 0.9 exactly
        ("power", 1000, {}, 0.9),  # 1001/1010 > 0.9 -> capped
        ("power", 3, {"warmup_steps": 2}, 0.8),  # 4/5
        # linear: d0 + (d - d0) * min(step / W, 1)
        ("linear", 0, {"initial_decay": 0.5}, 0.5),
        ("linear", 1, {"initial_decay": 0.5}, 0.5 + 0.4 * 0.1),
        ("linear", 5, {"initial_decay": 0.5}, 0.7),
        ("linear", 10, {"initial_decay": 0.5}, 0.9),
        ("linear", 50, {"initial_decay": 0.5}, 0.9),
        # piecewise_linear: 0 if step < flat else min((step - flat) * rate, d)
        ("piecewise_linear", 0, {"flat_steps": 3, "ramp_rate": 0.1}, 0.0),
        ("piecewise_linear", 1, {"flat_steps": 3, "ramp_rate": 0.1}, 0.0),
        ("piecewise_linear", 3, {"flat_steps": 3, "ramp_rate": 0.1}, 0.0),
        ("piecewise_linear", 7, {"flat_steps": 3, "ramp_rate": 0.1}, 0.4),
        ("piecewise_linear", 100, {"flat_steps": 3, "ramp_rate": 0.1}, 0.9),
        ("piecewise_linear", 1, {}, 0.001),  # defaults: flat 0, rate 0.001
        # cosine: d0 + (d - d0) * (1 - cos(pi * min(step / T, 1))) / 2, T = 100, d0 = 0.5
        ("cosine", 0, {"initial_decay": 0.5, "decay_steps": 100}, 0.5),
        (
            "cosine",
            1,
            {"initial_decay": 0.5, "decay_steps": 100},
            0.5 + 0.4 * (1 - math.cos(math.pi / 100)) / 2,
        ),
        ("cosine", 50, {"initial_decay": 0.5, "decay_steps": 100}, 0.7),
        ("cosine", 100, {"initial_decay": 0.5, "decay_steps": 100}, 0.9),
        ("cosine", 1000, {"initial_decay": 0.5, "decay_steps": 100}, 0.9),
        # warmup_cosine: 0 -> d0 linearly over W = 4 steps, then cosine d0 -> d over T = 10 steps
        ("warmup_cosine", 0, {"initial_decay": 0.5, "warmup_steps": 4, "decay_steps": 10}, 0.0),
        ("warmup_cosine", 1, {"initial_decay": 0.5, "warmup_steps": 4, "decay_steps": 10}, 0.125),
        ("warmup_cosine", 2, {"initial_decay": 0.5, "warmup_steps": 4, "decay_steps": 10}, 0.25),
        ("warmup_cosine", 4, {"initial_decay": 0.5, "warmup_steps": 4, "decay_steps": 10}, 0.5),
        ("warmup_cosine", 9, {"initial_decay": 0.5, "warmup_steps": 4, "decay_steps": 10}, 0.7),
        ("warmup_cosine", 14, {"initial_decay": 0.5, "warmup_steps": 4, "decay_steps": 10}, 0.9),
        ("warmup_cosine", 99, {"initial_decay": 0.5, "warmup_steps": 4, "decay_steps": 10}, 0.9),
    ],
)
def test_decay_at_hand_values(schedule, step, kwargs, expected):
    assert decay_at(schedule, step, 0.9, **kwargs) == pytest.approx(expected, abs=1e-12)


def test_decay_at_every_schedule_is_covered():
    assert set(EMA_DECAY_SCHEDULES) == {
        "constant",
        "power",
        "linear",
        "piecewise_linear",
        "cosine",
        "warmup_cosine",
    }
    for s in EMA_DECAY_SCHEDULES:
        for step in range(0, 3000, 37):
            assert 0.0 <= decay_at(s, step, 0.99, initial_decay=0.3) <= 0.99


def test_decay_at_errors():
    with pytest.raises(ValueError, match="piecewise_linear"):  # names the valid choices
        decay_at("exponential", 0, 0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        decay_at("constant", 0, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        decay_at("constant", 0, -0.1)
    with pytest.raises(ValueError, match="step"):
        decay_at("constant", -1, 0.9)
    with pytest.raises(TypeError):
        decay_at("constant", 0, 0.9, warmup=3)  # mistyped option names are errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ema_decay_schedule": "exp"}, "constant, power, linear, piecewise_linear, cosine, warmup_cosine"),
        ({"ema_decay": 1.01}, "ema_decay"),
        ({"ema_decay": -0.5}, "ema_decay"),
        ({"initial_decay": 2.0}, "initial_decay"),
        ({"ema_update_interval": 0}, "ema_update_interval"),
        ({"ema_device": "not-a-device"}, "same_as_model"),
        ({"flat_steps": -1}, "flat_steps"),
        ({"ramp_rate": -0.1}, "ramp_rate"),
        ({"decay_steps": 0}, "decay_steps"),
    ],
)
def test_ema_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


# ---------------------------------------------------------------------------- tiny modules
def _data(n=16, batch_size=4, repeat_first_batch=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    if repeat_first_batch:
        x = x[:batch_size].repeat(n // batch_size, 1)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Regression(LightningModule):
    """Linear regression; ``frozen`` takes part in the forward pass but is not trained."""

    def __init__(self, manual: bool = False, steps_per_batch: int = 1, freeze_bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.frozen = nn.Linear(3, 1)
        self.frozen.requires_grad_(False)
        if freeze_bias:
            self.layer.bias.requires_grad_(False)
        self.automatic_optimization = not manual
        self.steps_per_batch = steps_per_batch
        self.history = []  # trained weights after each training batch
        self.val_seen = []  # (weights seen in validation, EMA at that time)

    def forward(self, x):
        return self.layer(x) + 0.1 * self.frozen(x)

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self._loss(batch)
        opt = self.optimizers()
        for _ in range(self.steps_per_batch):
            opt.zero_grad()
            self.manual_backward(self._loss(batch))
            opt.step()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.history.append(_snapshot(self))

    def validation_step(self, batch, batch_idx):
        ema = next(cb for cb in self.trainer.callbacks if isinstance(cb, EMA))
        self.val_seen.append((_snapshot(self), {k: v.clone() for k, v in ema.averaged_parameters.items()}))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _trained(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _trainer(tmp_path, ema, max_steps, **kw):
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("callbacks", [ema])
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        default_root_dir=tmp_path,
        **kw,
    )


def _hand_ema(init, history, decays, interval=1):
    """Reference EMA in float64 over the snapshots taken every ``interval`` batches."""
    ema = {n: t.double() for n, t in init.items()}
    k = 0
    for i, snap in enumerate(history, start=1):
        if i % interval:
            continue
        d = decays(k)
        ema = {n: d * ema[n] + (1 - d) * snap[n].double() for n in ema}
        k += 1
    return ema, k


def _assert_close(ema_cb, ref):
    got = ema_cb.averaged_parameters
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n].double(), ref[n], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- training
def test_ema_matches_hand_rolled_average_automatic(tmp_path):
    model = Regression()
    init = _trained(model)
    frozen_before = model.frozen.weight.detach().clone()
    ema = EMA(ema_decay=0.9, ema_decay_schedule="power", warmup_steps=2)
    _trainer(tmp_path, ema, max_steps=6).fit(model, _data())

    assert len(model.history) == 6
    ref, k = _hand_ema(init, model.history, lambda s: decay_at("power", s, 0.9, warmup_steps=2))
    assert ema.num_updates == k == 6
    _assert_close(ema, ref)
    # only trained parameters are averaged; frozen ones are untouched
    assert set(ema.averaged_parameters) == {"layer.weight", "layer.bias"}
    assert torch.equal(model.frozen.weight, frozen_before)
    # the average is a float32 copy on the cpu, not the parameter itself
    for name, t in ema.averaged_parameters.items():
        assert t.device.type == "cpu" and t.dtype == torch.float32
        assert t.data_ptr() != dict(model.named_parameters())[name].data_ptr()
    # the live weights are the trained ones, and differ from the average
    assert not torch.equal(model.layer.weight.detach(), ema.averaged_parameters["layer.weight"])
    assert ema.current_decay == pytest.approx(decay_at("power", 6, 0.9, warmup_steps=2))


def test_frozen_bias_is_not_averaged(tmp_path):
    model = Regression(freeze_bias=True)
    ema = EMA(ema_decay=0.5)
    _trainer(tmp_path, ema, max_steps=3).fit(model, _data())
    assert set(ema.averaged_parameters) == {"layer.weight"}


def test_manual_optimization_updates_once_per_batch(tmp_path):
    model = Regression(manual=True, steps_per_batch=2)
    init = _trained(model)
    ema = EMA(ema_decay=0.8, ema_decay_schedule="piecewise_linear", flat_steps=1, ramp_rate=0.3)
    trainer = _trainer(tmp_path, ema, max_steps=10)  # 2 optimizer steps per batch -> 5 batches
    trainer.fit(model, _data())
    assert trainer.global_step == 10 and len(model.history) == 5
    ref, k = _hand_ema(
        init, model.history, lambda s: decay_at("piecewise_linear", s, 0.8, flat_steps=1, ramp_rate=0.3)
    )
    assert ema.num_updates == k == 5
    _assert_close(ema, ref)


def test_update_interval(tmp_path):
    model = Regression()
    init = _trained(model)
    ema = EMA(ema_decay=0.7, ema_update_interval=3)
    _trainer(tmp_path, ema, max_steps=7).fit(model, _data())
    ref, k = _hand_ema(init, model.history, lambda s: 0.7, interval=3)
    assert ema.num_updates == k == 2
    _assert_close(ema, ref)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = Regression()
    init = _trained(model)
    ema = EMA(ema_decay=0.7)
    _trainer(tmp_path, ema, max_steps=2, accumulate_grad_batches=2).fit(model, _data())
    assert len(model.history) == 4
    ref, k = _hand_ema(init, model.history[1::2], lambda s: 0.7)
    assert ema.num_updates == k == 2
    _assert_close(ema, ref)


@pytest.mark.parametrize("swap", [True, False])
def test_validation_sees_average_and_weights_are_restored(tmp_path, swap):
    model = Regression()
    ema = EMA(ema_decay=0.9, swap_for_validation=swap)
    trainer = _trainer(tmp_path, ema, max_steps=4, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, _data(), _data())
    assert len(model.val_seen) == 1  # one validation, at the end of the 4-batch epoch
    seen, avg = model.val_seen[0]
    live = model.history[-1]
    for n in avg:
        assert torch.equal(seen[n], avg[n] if swap else live[n])
        assert not torch.equal(avg[n], live[n])
    # after validation the live weights are back, bit for bit
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), live[n])
    assert not ema.is_swapped


def test_swapped_restores_on_exception_and_keeps_float32():
    model = Regression().to(torch.bfloat16)
    ema = EMA(ema_decay=0.5, ema_device="same_as_model")
    ema.on_fit_start(None, model)  # what the Trainer does at fit start
    before = _snapshot(model)
    with torch.no_grad():
        model.layer.weight.add_(0.37)
    ema.update(model)
    live = _snapshot(model)
    avg = ema.averaged_parameters["layer.weight"]
    assert avg.dtype == torch.float32
    torch.testing.assert_close(
        avg, 0.5 * before["layer.weight"].float() + 0.5 * live["layer.weight"].float(), atol=0, rtol=0
    )
    with pytest.raises(KeyError):
        with ema.swapped(model):
            assert torch.equal(model.layer.weight.detach(), avg.to(torch.bfloat16))
            with ema.swapped(model):  # nested: no-op
                pass
            assert ema.is_swapped
            raise KeyError("boom")
    assert not ema.is_swapped
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), live[n])
    assert model.layer.weight.requires_grad and model.layer.weight.grad is None


def test_checkpoint_written_while_swapped_holds_live_weights():
    model = Regression()
    ema = EMA(ema_decay=0.5)
    ema.on_fit_start(None, model)
    with torch.no_grad():
        model.layer.weight.add_(1.0)
    ema.update(model)
    live = model.layer.weight.detach().clone()
    with ema.swapped(model):
        ckpt = {"state_dict": model.state_dict()}
        ema.on_save_checkpoint(None, model, ckpt)
    assert torch.equal(ckpt["state_dict"]["layer.weight"], live)


def test_decay_zero_disables_averaging(tmp_path):
    model = Regression()
    ema = EMA(ema_decay=0.0)
    _trainer(tmp_path, ema, max_steps=3).fit(model, _data())
    assert ema.averaged_parameters == {} and ema.current_decay == 0.0
    live = _snapshot(model)
    with ema.swapped(model):
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), live[n])


def test_swapped_before_fit_is_noop():
    model = Regression()
    live = _snapshot(model)
    with EMA().swapped(model):
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), live[n])


# ---------------------------------------------------------------------------- checkpoints
def _fit(tmp_path, max_steps, ckpt_path=None, model=None, ema=None, save_every_epoch=False):
    """Fit; with ``save_every_epoch`` a ModelCheckpoint writes ``tmp_path/epoch=<n>.ckpt`` at each epoch end.

    Every batch is the same: Lightning 2.6 replays one extra batch of the epoch when it resumes from an
    epoch-end checkpoint with a plain DataLoader, which would change the data order (not the EMA's doing).
    """
    model = model or Regression()
    ema = ema or EMA(ema_decay=0.9, ema_decay_schedule="power", warmup_steps=2, ema_update_interval=2)
    kw = {}
    if save_every_epoch:
        ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        kw = {"enable_checkpointing": True, "callbacks": [ema, ckpt_cb]}
    trainer = _trainer(tmp_path, ema, max_steps=max_steps, **kw)
    trainer.fit(model, _data(repeat_first_batch=True), ckpt_path=ckpt_path)
    return trainer, model, ema


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    _, full_model, full_ema = _fit(tmp_path / "full", 10)

    # checkpoint at an epoch end (4 batches per epoch): a plain DataLoader cannot resume mid-epoch
    _fit(tmp_path / "first", 6, save_every_epoch=True)
    ckpt = tmp_path / "first" / "epoch=0.ckpt"
    assert torch.load(ckpt, weights_only=True)["callbacks"]["EMA"]["num_updates"] == 2

    fresh = EMA(ema_decay=0.9, ema_decay_schedule="power", warmup_steps=2, ema_update_interval=2)
    assert fresh.averaged_parameters == {}  # buffers are created lazily at fit start
    _, resumed_model, resumed_ema = _fit(tmp_path / "resumed", 10, ckpt_path=ckpt, ema=fresh)

    assert resumed_ema.num_updates == full_ema.num_updates == 5
    for n, p in full_model.named_parameters():
        assert torch.equal(dict(resumed_model.named_parameters())[n], p)
    assert not torch.equal(full_ema.averaged_parameters["layer.weight"], full_model.layer.weight.detach())
    for n, t in full_ema.averaged_parameters.items():
        assert torch.equal(resumed_ema.averaged_parameters[n], t)


def test_state_dict_roundtrip_into_existing_buffers():
    model = Regression()
    ema = EMA(ema_decay=0.5)
    ema.on_fit_start(None, model)
    with torch.no_grad():
        model.layer.weight.add_(1.0)
    ema.update(model)
    state = ema.state_dict()
    other = EMA(ema_decay=0.5)
    other.on_fit_start(None, Regression())
    other.load_state_dict(state)  # buffers exist already: applied at once
    assert other.num_updates == 1
    for n, t in ema.averaged_parameters.items():
        assert torch.equal(other.averaged_parameters[n], t)


def test_resume_with_other_trained_parameters_fails_clearly(tmp_path):
    trainer, _, _ = _fit(tmp_path / "a", 2)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(RuntimeError, match="only in the checkpoint.*layer.bias"):
        _fit(tmp_path / "b", 4, ckpt_path=ckpt, model=Regression(freeze_bias=True))


def test_resume_with_changed_config_warns(tmp_path):
    trainer, _, _ = _fit(tmp_path / "a", 2)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="ema_decay: 0.9 -> 0.5"):
        _, _, ema = _fit(tmp_path / "b", 4, ckpt_path=ckpt, ema=EMA(ema_decay=0.5, ema_update_interval=2))
    assert ema.num_updates == 2 and ema.ema_decay == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_average_of_gpu_model(tmp_path):
    model = Regression()
    ema = EMA(ema_decay=0.9, ema_device="cpu")
    Trainer(
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        max_steps=3,
        callbacks=[ema],
        default_root_dir=tmp_path,
    ).fit(model, _data())
    assert model.layer.weight.device.type == "cuda"
    assert all(t.device.type == "cpu" for t in ema.averaged_parameters.values())
    with ema.swapped(model):
        assert model.layer.weight.device.type == "cuda"
        assert torch.equal(model.layer.weight.detach().cpu(), ema.averaged_parameters["layer.weight"])


def test_validate_from_checkpoint_uses_the_saved_average(tmp_path):
    _, _, ema = _fit(tmp_path / "a", 4, save_every_epoch=True)
    saved = {k: v.clone() for k, v in ema.averaged_parameters.items()}
    model, fresh = (
        Regression(),
        EMA(ema_decay=0.9, ema_decay_schedule="power", warmup_steps=2, ema_update_interval=2),
    )
    trainer = _trainer(tmp_path / "b", fresh, max_steps=1, limit_val_batches=1)
    trainer.validate(model, _data(), ckpt_path=tmp_path / "a" / "epoch=0.ckpt", verbose=False)
    seen, avg = model.val_seen[0]
    for n, t in saved.items():
        assert torch.equal(avg[n], t) and torch.equal(seen[n], t)
    assert not torch.equal(model.layer.weight.detach(), saved["layer.weight"])  # live weights restored


def test_callbacks_package_needs_only_torch_and_lightning():
    import subprocess
    import sys

    code = (
        "import sys, torch, lightning.pytorch; "
        "before = {m.split('.')[0] for m in sys.modules}; "
        "import callbacks; "
        "new = {m.split('.')[0] for m in sys.modules} - before; "
        "assert new == {'callbacks'}, new"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_used_for_validation_picks_the_built_swapping_ema():
    model = Regression()
    disabled, no_swap, used = EMA(ema_decay=0.0), EMA(swap_for_validation=False), EMA()
    callbacks = [ModelCheckpoint(), disabled, no_swap, used]
    assert EMA.used_for_validation(callbacks) is None  # nothing built yet
    for ema in (disabled, no_swap, used):
        ema.on_fit_start(None, model)
    assert EMA.used_for_validation(callbacks) is used
    assert EMA.used_for_validation([no_swap, disabled]) is None
