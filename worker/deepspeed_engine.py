"""``DeepSpeedEngine``: the HF slice loop around ``deepspeed.init_inference``.

One loop, two model wrappers: this class only builds the DeepSpeed ``InferenceEngine`` and hands its
forward to :class:`worker.hf_engine.HFEngine`, which owns the slice loop, stopping and KV handling.

- CPU (``DS_ACCELERATOR=cpu``): no kernel injection and no tensor parallelism (TP crashes on CPU here);
  DeepSpeed then runs the very same module, so outputs equal transformers' token for token.
- CUDA: ``replace_with_kernel_inject=True`` swaps in DeepSpeed's fused transformer kernels. Those kernels
  keep their own KV cache instead of transformers' ``DynamicCache``, so cross-slice KV reuse is turned off
  on that path. (Not proven on this machine: it has no GPU; the GPU test is skipped with a reason.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from worker.hf_engine import DEFAULT_KV_BUDGET_BYTES, PREALLOCATE_STEPS, HFEngine, load_model, resolve_dtype

log = logging.getLogger(__name__)


def init_deepspeed(model, dtype: torch.dtype, kernel_inject: bool):
    """Wrap ``model`` in a DeepSpeed InferenceEngine (single process, no tensor parallelism)."""
    if next(model.parameters()).device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # deepspeed.comm wants a process group even for one process: describe a world of one on loopback.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    return deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=kernel_inject)


class DeepSpeedEngine(HFEngine):
    """Slice engine on DeepSpeed-Inference (kernel injection on CUDA, plain module on CPU)."""

    backend = "deepspeed"

    def __init__(
        self,
        model,
        *,
        kernel_inject: bool | None = None,
        kv_reuse: bool = True,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
    ):
        device = next(model.parameters()).device
        if kernel_inject is None:
            kernel_inject = device.type == "cuda"
        if kernel_inject and device.type != "cuda":
            raise ValueError("DeepSpeed kernel injection needs a CUDA device")
        self.kernel_inject = kernel_inject
        self.ds_engine = init_deepspeed(model, next(model.parameters()).dtype, kernel_inject)
        module = self.ds_engine.module  # the (possibly kernel-injected) model DeepSpeed runs
        super().__init__(
            module,
            kv_reuse=kv_reuse and not kernel_inject,
            kv_budget_bytes=kv_budget_bytes,
            forward=self.ds_engine,
            # Injected kernels keep their own KV layout; hand them only the growing transformers cache.
            preallocate_steps=0 if kernel_inject else PREALLOCATE_STEPS,
        )

    @classmethod
    def from_pretrained(
        cls, model_path: str | Path, device: str = "cpu", dtype: str = "float32", **kwargs
    ) -> "DeepSpeedEngine":
        if device.startswith("cuda") and resolve_dtype(dtype) == torch.float32 and kwargs.get("kernel_inject") is not False:
            log.info("DeepSpeed kernel injection runs in half precision; loading float16")
            dtype = "float16"
        return cls(load_model(model_path, device, dtype), **kwargs)
