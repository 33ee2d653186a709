"""callbacks.IterationTimes: seconds per step and the time left, as a plain log line."""

import time

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import IterationTimes
from callbacks.timing import format_duration


class Sleepy(L.LightningModule):
    """A step that takes 20 ms, a validation that takes 100 ms."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return self.net(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(0.1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_line_with_seconds_per_step_and_the_time_to_the_end_and_to_the_next_validation(caplog):
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)
    timer = IterationTimes(every_n_steps=2, warmup_steps=1)
    trainer = L.Trainer(max_steps=9, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(Sleepy(), data, data)
    assert [line.split(":")[0] for line in timer.lines] == ["[flowrl] step 2", "[flowrl] step 4", "[flowrl] step 6",
                                                            "[flowrl] step 8"]
    per_step = float(timer.lines[0].split(": ")[1].split(" s per step")[0])
    assert 0.02 <= per_step < 0.5  # the 20 ms step, training only
    assert "to step 9" in timer.lines[0] and "to the next validation (iteration 4)" in timer.lines[0]
    assert "(plus 2 validation(s) not yet timed)" in timer.lines[0]  # after iterations 4 and 8, none run yet
    assert timer.lines[1].endswith("validating now")  # iteration 4: the validation runs right after the line
    assert "not yet timed" not in timer.lines[2] and "to the next validation (iteration 8)" in timer.lines[2]
    assert timer.validation_seconds >= 0.1


@pytest.mark.parametrize("sanity, timed", [(-1, True), (1, False)])
def test_a_whole_before_validation_times_the_validations_to_come(sanity, timed):
    """``num_sanity_val_steps: -1`` runs the whole validation before training (the "before" numbers): its time stands
    for the validations to come from the first line on; a sanity check of a few batches does not."""
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)
    timer = IterationTimes(every_n_steps=2, warmup_steps=1)
    trainer = L.Trainer(max_steps=5, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=2,
                        num_sanity_val_steps=sanity, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(Sleepy(), data, data)
    assert ("not yet timed" not in timer.lines[0]) == timed


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (45.4, "45 s"), (200, "3 min 20 s"), (3900, "1 h 05 min")])
def test_durations_read_as_a_person_says_them(seconds, text):
    assert format_duration(seconds) == text


def test_bad_intervals_are_refused():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        IterationTimes(every_n_steps=0)
