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
    monkeypatch.setattr(device_helpers, "available_host_memory", lambda: 256 * GIB)
    opts = SimpleNamespace(cpu_moe=False, n_cpu_moe=0, expert_slots=None, gpu_memory=24 * GIB, quant="int4",
                           quant_lm_head=False, compile=False)
    config = AriaConfig.from_dict(aria_config_dict())
    plan = assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192)
    assert plan.budget == 20 * GIB
    assert "warning: --gpu-memory 24.0 GiB is more than the 20.0 GiB free on cuda:0; planning for 20.0 GiB" in (
        capsys.readouterr().err)
    opts.gpu_memory = 16 * GIB  # below what is free: the user's number stands
    assert assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192).budget == 16 * GIB


def test_a_plan_whose_pinned_experts_do_not_fit_cpu_memory_is_refused_before_loading(monkeypatch):
    """Offloaded experts are pinned (never swapped): bf16 Aria on a 24 GB card pins ~45 GB."""
    from runtime import device as device_helpers
    from runtime.errors import PlacementError

    monkeypatch.setattr(device_helpers, "free_memory", lambda device: 24 * GIB)
    config = AriaConfig.from_dict(aria_config_dict())
    opts = SimpleNamespace(cpu_moe=False, n_cpu_moe=0, expert_slots=None, gpu_memory=None, quant="none",
                           quant_lm_head=False, compile=False)
    monkeypatch.setattr(device_helpers, "available_host_memory", lambda: 30 * GIB)
    with pytest.raises(PlacementError, match=r"keeps 4\d\.\d GB of experts in CPU memory, but only 32\.2 GB is "
                                             r"available; use --quant int8 or int4, or free some memory"):
        assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192)
    monkeypatch.setattr(device_helpers, "available_host_memory", lambda: 64 * GIB)
    plan = assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192)
    assert 30 * GIB < plan.host_bytes < 63 * GIB


def test_available_cpu_memory_is_read_from_the_system():
    from runtime.device import available_host_memory

    with open("/proc/meminfo", encoding="ascii") as meminfo:
        expected = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    assert abs(available_host_memory() - expected) < 2**30  # read a moment apart


def test_int4_cached_experts_keep_one_host_copy_when_two_do_not_fit(monkeypatch):
    """int4 keeps a second (CPU-layout) host copy of each cached expert only to compute misses on
    the CPU; when CPU memory cannot hold both, every miss is fetched instead."""
    from runtime import device as device_helpers
    from runtime.errors import PlacementError

    monkeypatch.setattr(device_helpers, "free_memory", lambda device: 16 * GIB)
    config = AriaConfig.from_dict(aria_config_dict())
    opts = SimpleNamespace(cpu_moe=False, n_cpu_moe=0, expert_slots=None, gpu_memory=None, quant="int4",
                           quant_lm_head=False, compile=False)
    monkeypatch.setattr(device_helpers, "available_host_memory", lambda: 256 * GIB)
    roomy = assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192)
    assert roomy.miss_policy == "auto" and roomy.host_layout_copy_bytes > 0
    one_copy = roomy.host_bytes - roomy.host_layout_copy_bytes
    monkeypatch.setattr(device_helpers, "available_host_memory", lambda: one_copy + 2 * GIB)
    tight = assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192)
    assert tight.miss_policy == "fetch" and tight.host_bytes == one_copy and tight.layers == roomy.layers
    monkeypatch.setattr(device_helpers, "available_host_memory", lambda: one_copy // 2)
    with pytest.raises(PlacementError, match="is available; free some memory, or use a GPU with more memory"):
        assistant_loader.plan_for(opts, config, torch.device("cuda", 0), torch.bfloat16, 8192)
