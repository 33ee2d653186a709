"""flowrl: Lightning modules for RL fine-tuning of flow-matching generative models."""

import logging

__version__ = "0.1.0"


class _SameProcessingWithoutTorchvision(logging.Filter):
    """transformers announces, when diffusers imports it, that its image processors fall back to their PIL versions
    where torchvision is missing: the same processing for every pipeline and reward flowrl uses, so the two lines
    it prints at every start say nothing to a flowrl user. Only that message is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_SameProcessingWithoutTorchvision())


class _NoFourBitKernelNeeded(logging.Filter):
    """bitsandbytes, when imported on a CPU with AVX512-BF16, tries to fetch a 4-bit matmul kernel from the Hub and
    warns when it cannot (no network, or the repository's publisher is not on the trust list). flowrl has no 4-bit
    path (its frozen weights are float32 or bf16), so that kernel is never used; only that message is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load CPU gemm_4bit_forward" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoFourBitKernelNeeded())
