"""GPU paths: DeepSpeed kernel injection and the HF engine on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.worker.helpers import Req, run_sliced

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none on this machine)")


def _greedy_reference(model, prompt, n):
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("slice_len", [1, 4, None])
def test_hf_cuda_sliced_equals_generate(model_dir, prompts, slice_len):
    from worker.hf_engine import HFEngine

    eng = HFEngine.from_pretrained(model_dir, device="cuda", dtype="float32")
    reqs = [Req(f"r{i}", p, b) for i, (p, b) in enumerate(prompts)]
    run_sliced([eng], reqs, slice_len)
    for r in reqs:
        assert r.generated == _greedy_reference(eng.model, r.prompt, r.budget)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("slice_len", [1, 4, None])
def test_deepspeed_kernel_injection_sliced_equals_generate(model_dir, prompts, slice_len):
    """Kernel injection runs in fp16, so compare with generate of the same fp16 model, token for token."""
    from worker.deepspeed_engine import DeepSpeedEngine
    from worker.hf_engine import load_model

    ref_model = load_model(model_dir, "cuda", "float16")
    eng = DeepSpeedEngine.from_pretrained(model_dir, device="cuda")
    assert eng.kernel_inject and not eng.kv_reuse
    reqs = [Req(f"r{i}", p, b) for i, (p, b) in enumerate(prompts)]
    run_sliced([eng], reqs, slice_len)
    for r in reqs:
        assert r.generated == _greedy_reference(ref_model, r.prompt, r.budget)
