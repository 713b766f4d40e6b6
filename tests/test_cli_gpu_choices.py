"""What the loader decides for a GPU before reading a weight, with the GPU's answers stood in
(no GPU here): the compute dtype from the chosen GPU's compute capability, quantizations whose
kernels cannot run there refused in one line, and --gpu-memory capped by what is free."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aria_cli import assistant_loader
from runtime.config import AriaConfig
from runtime.errors import UsageError
from runtime.known_configs import aria_config_dict

GIB = 2**30


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device whose compute capability the test sets; asks about other GPUs fail."""
    state = {"capability": (8, 6)}

    def capability(device=None):
        assert torch.device(device) == torch.device("cuda", 1), "asked about another GPU than the chosen one"
        return state["capability"]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("asks the current GPU"))
    return state


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                      ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_bfloat16_only_where_the_chosen_gpu_computes_it(gpu, capability, expected):
    gpu["capability"] = capability
    assert assistant_loader.pick_dtype("auto", torch.device("cuda", 1)) == expected
    assert assistant_loader.pick_dtype("float32", torch.device("cuda", 1)) == torch.float32
    assert assistant_loader.pick_dtype("auto", torch.device("cpu")) is None  # the checkpoint's own


def test_int4_on_a_gpu_its_kernel_cannot_use_is_refused_before_loading(gpu):
    cuda = torch.device("cuda", 1)
    gpu["capability"] = (7, 5)  # Turing: no int4 tinygemm
    with pytest.raises(UsageError, match=r"compute capability 8\.0\+\); cuda:1 is 7\.5; use --quant int8 or nf4"):
        assistant_loader.check_scheme_runs("int4", cuda, torch.float16)
    gpu["capability"] = (8, 6)
    with pytest.raises(UsageError, match="computes in bfloat16, not float16"):
        assistant_loader.check_scheme_runs("int4", cuda, torch.float16)
    assistant_loader.check_scheme_runs("int4", cuda, torch.bfloat16)
    for runs_anywhere in ("int8", "nf4", None):
        assistant_loader.check_scheme_runs(runs_anywhere, cuda, torch.float16)
    assistant_loader.check_scheme_runs("int4", torch.device("cpu"), None)


def test_gpu_memory_above_what_is_free_plans_for_what_is_free(monkeypatch, capsys):
    from runtime import device as device_helpers

    monkeypatch.setattr(device_helpers, "free_memory", lambda device: 20 * GIB)
    opts = SimpleNamespace(cpu_moe=False, n_cpu_moe=0, expert_slots=None, gpu_memory=24 * GIB, quant="int4",
                           quant_lm_head=False)
    config = AriaConfig.from_dict(aria_config_dict())
    plan = assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192)
    assert plan.budget == 20 * GIB
    assert "warning: --gpu-memory 24.0 GiB is more than the 20.0 GiB free on cuda:0; planning for 20.0 GiB" in (
        capsys.readouterr().err)
    opts.gpu_memory = 16 * GIB  # below what is free: the user's number stands
    assert assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192).budget == 16 * GIB
