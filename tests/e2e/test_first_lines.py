"""What a newcomer reads first: the opening lines of `flowrl fit` on the main job carry no traceback and none of the
known noise (warnings flowrl causes, and third-party lines flowrl knows do not apply)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: lines that once opened every run, each now gone at its source or left out by a filter on that message only
NOISE = [
    "not recommended to provide both args and command line arguments",  # LightningCLI: flowrl passes its argv
    "requires torchvision (not installed); falling back to",  # transformers at import: the same processing
    "in eval mode at the start of training",  # the frozen encoders and VAE are in eval mode on purpose
    "Total FLOPs",  # Lightning's model summary (0 for a pipeline); flowrl logs one line of its own
    "is deprecated",  # Lightning's use of a torch pytree name
    "Tip:",  # Lightning's advert for its cloud logger
    "Loading pipeline components", "Loading weights",  # loading progress bars, when output is not a terminal
    "gemm_4bit_forward",  # bitsandbytes on an AVX512-BF16 CPU: a Hub kernel for a 4-bit path flowrl does not have
    "Warning", "warning", "Traceback",
]


def test_the_first_lines_of_the_main_job_are_clean(tmp_path):
    code = "import sys; from flowrl.cli import console_main; console_main(sys.argv[1:])"
    args = ["fit", "--config", os.path.join(ROOT, "lightning_configs", "toy", "nft.yaml"), "--trainer.max_steps=1",
            "--data.batch_size=16", "--model.train_batch_size=8", "--model.gradient_accumulation_steps=2",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()][:30]
    noisy = [ln for ln in lines if any(n in ln for n in NOISE)]
    assert not noisy, "\n".join(noisy)
    text = "\n".join(lines)
    assert "flowrl: trainer.precision not set" in text or "precision" in text  # the precision it runs in
    assert "[flowrl] NFT: 587,152 of 669,655 parameters trained (full), dynamics ODE" in text
    # one folder for the run's logs: the CSV log and TensorBoard's (under tensorboard/), not version_0 and version_1
    logs = tmp_path / "runs" / "toy-nft" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    assert (logs / "version_0" / "metrics.csv").is_file() and any((logs / "version_0" / "tensorboard").iterdir())
