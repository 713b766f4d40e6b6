"""Decode's bf16 gemv path and expert re-layout change how weights are read, never what they are.

Products are checked against float64 hand products (bf16 inputs, exact arithmetic); the
re-layout against the tensors before it, and a re-laid model against the same model as loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.decode_kernels import gemv, linear, row_matmul, use_gemv_layout
from runtime.generate import decode_logits
from runtime.loader import load_model
from runtime.model import build_model, init_random_weights
from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint

BF16_REL = 2**-7  # bf16 keeps 8 significant bits; one rounding of the fp32-accumulated result


def exact(x, w_out_in):
    return (x.double() @ w_out_in.double().T).float()


def assert_bf16_close(got, expected):
    assert got.dtype == torch.bfloat16
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() <= BF16_REL * scale


def test_linear_on_one_bf16_row_is_the_exact_product_rounded():
    gen = torch.Generator().manual_seed(0)
    module = nn.Linear(96, 40, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(torch.randn(40, 96, generator=gen))
    for shape in [(1, 96), (1, 1, 96)]:
        x = torch.randn(shape, generator=gen).to(torch.bfloat16)
        got = linear(module, x)
        assert got.shape == (*shape[:-1], 40)
        assert_bf16_close(got, exact(x, module.weight))
    several = torch.randn(3, 96, generator=gen).to(torch.bfloat16)  # not one row: the module itself
    assert torch.equal(linear(module, several), module(several))
    x32 = torch.randn(1, 96, generator=gen)
    module32 = module.float()
    assert torch.equal(linear(module32, x32), module32(x32))


def test_row_matmul_reads_either_layout():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 48, generator=gen).to(torch.bfloat16)  # [in, out]
    relaid = w.T.contiguous().T  # same values, [out, in] memory
    assert relaid.stride() == (1, 64) and torch.equal(relaid, w)
    x = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
    for weight in (w, relaid):
        assert_bf16_close(row_matmul(x, weight), exact(x, w.T))
    xs = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(row_matmul(xs, relaid), xs @ relaid)


def test_use_gemv_layout_keeps_every_tensor_and_releases_each_source():
    model = init_random_weights(build_model(tiny_config(), device="cpu")).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    released = []
    moved = use_gemv_layout(model, release=released.append)
    layers = model.config.text.num_hidden_layers
    expected_names = {f"language_model.model.layers.{i}.mlp.experts.{p}.weight" for i in range(layers)
                      for p in ("fc1", "fc2")}
    assert set(released) == expected_names and len(released) == len(expected_names)
    assert moved == sum(before[n].numel() * 2 for n in expected_names)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.shape == before[name].shape and torch.equal(tensor, before[name]), name
        if name in expected_names:
            assert tensor.transpose(1, 2).is_contiguous()
        else:
            assert tensor.is_contiguous()
    assert use_gemv_layout(model) == 0  # already done
    fp32 = init_random_weights(build_model(tiny_config(), device="cpu"))
    assert use_gemv_layout(fp32, release=released.append) == 0


def test_loaded_bf16_model_is_relaid_and_computes_the_same(tmp_path):
    config = tiny_config()
    path = write_tiny_checkpoint(tmp_path / "ckpt", "c1", seed=2, config=config, dtype=torch.bfloat16)
    loaded = load_model(path, dtype=torch.bfloat16)
    fc1 = loaded.language_model.model.layers[0].mlp.experts.fc1.weight
    assert fc1.transpose(1, 2).is_contiguous()
    plain = init_random_weights(build_model(config, device="cpu"), seed=2).to(torch.bfloat16)
    plain.reset_buffers()
    ids = torch.randint(10, config.text.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        caches = [loaded.new_cache(32), plain.new_cache(32)]
        prefill = [m(ids, c, 0, all_logits=True) for m, c in zip((loaded, plain), caches)]
        step = [decode_logits(m, torch.tensor([[99]]), c, 24) for m, c in zip((loaded, plain), caches)]
    for got, expected in (prefill, step):
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_forward_hooks_still_see_every_call():
    """Instrumentation (e.g. routing traces) hooks the modules; the direct paths must not skip them."""
    seen = []
    for dtype in (torch.float32, torch.bfloat16):
        module = nn.Linear(16, 8, bias=False).to(dtype)
        module.register_forward_hook(lambda mod, args, out: seen.append(out))
        x = torch.randn(1, 16).to(dtype)
        out = linear(module, x)
        assert seen[-1] is out and torch.equal(out, torch.nn.functional.linear(x, module.weight))
    assert len(seen) == 2


def test_small_and_large_bf16_gemv_agree_with_the_exact_product_and_leave_onednn_on():
    """Small weights skip oneDNN for the call only; both kernels round the fp32 sum once."""
    gen = torch.Generator().manual_seed(4)
    for out_features, in_features in [(40, 96), (600, 512)]:  # below and above the crossover
        w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
        v = torch.randn(in_features, generator=gen).to(torch.bfloat16)
        assert_bf16_close(gemv(w, v)[None], exact(v[None], w))
        assert torch.backends.mkldnn.enabled


def test_compiled_gemv_is_the_eager_kernel_after_a_norm():
    """Compiled, a bf16 row product stays the gemv kernel (one opaque op): inductor would make
    it a reduction of its own, fused with the norm before it (as at the lm_head), which differs
    in rounding and was 4x slower. Equal bits to the eager product show the kernel ran; and the
    small-weight oneDNN switch around it still leaves oneDNN on."""
    gen = torch.Generator().manual_seed(3)
    head = nn.Linear(256, 1024, bias=False).to(torch.bfloat16)
    nn.init.normal_(head.weight, generator=gen)
    norm = torch.rand(256, generator=gen).bfloat16()
    x = torch.randn(1, 1, 256, generator=gen).bfloat16()

    def step(x):
        return linear(head, torch.nn.functional.rms_norm(x, (256,), norm, 1e-6))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert torch.equal(compiled(x), step(x))
    assert torch.backends.mkldnn.enabled
