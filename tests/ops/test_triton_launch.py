"""mambakit.ops.triton.launch: the cache key must change whenever Triton would compile the
kernel differently (a tensor's dtype or 16-byte alignment, an int's value), must never hold a
tensor, and a launch through the cache must give the same results as Triton's own path."""

import pytest
import torch

launch_mod = pytest.importorskip("mambakit.ops.triton.launch")
signature = launch_mod.signature


def test_signature_follows_dtype_alignment_and_values_but_holds_no_tensor():
    base = torch.zeros(64)
    aligned, shifted = base[:32], base[1:33]  # 4-byte shift: not 16-byte aligned
    assert signature([aligned, 3]) == signature([torch.zeros(32), 3])
    assert signature([aligned]) != signature([shifted])
    assert signature([aligned]) != signature([aligned.to(torch.float16)])
    assert signature([aligned, 1]) != signature([aligned, 16]) != signature([aligned, 17])
    # equal in Python, but Triton compiles a bool, an int and a float differently
    assert len({signature([True]), signature([1]), signature([1.0])}) == 3
    assert signature([0]) != signature([False]) != signature([0.0])
    param = torch.nn.Parameter(torch.zeros(8))  # a subclass: still keyed by dtype and alignment
    sig = signature([param, None, True])
    assert sig == ((torch.float32, param.data_ptr() % 16), (type(None), None), (bool, True))
    assert not any(isinstance(v, torch.Tensor) for item in sig for v in (item if isinstance(item, tuple) else (item,)))


def test_only_a_set_launch_hook_sends_launches_through_triton():
    """Triton 3.5+ keeps an empty HookChain as the launch hook: that is no hook (the first version
    of `launch` took it for one and never used its cache); a chain with a call, or a plain
    function (older Triton), is."""
    assert not launch_mod._hooked(None)
    knobs = pytest.importorskip("triton.knobs")
    chain = knobs.HookChain()
    assert not launch_mod._hooked(chain)
    chain.add(lambda *a: None)
    assert launch_mod._hooked(chain)
    assert launch_mod._hooked(lambda *a: None)


def test_a_cache_entry_lists_the_parameters_after_the_positional_ones_with_their_defaults():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def kernel(a_ptr, n, BLOCK: tl.constexpr, extra_ptr=None, FLAG: tl.constexpr = 3):
        pass

    class Compiled:  # what Triton returns from a launch: the launcher, the function, the metadata
        run, function, packed_metadata = object(), object(), object()

    launch_mod._remember("key", kernel, Compiled(), 2)
    try:
        assert launch_mod._CACHE["key"][3:] == (("BLOCK", "extra_ptr", "FLAG"), {"extra_ptr": None, "FLAG": 3}, kernel)
        launch_mod._remember("other", kernel, object(), 2)  # no launcher: not cached, and no error
        assert "other" not in launch_mod._CACHE
    finally:
        launch_mod.clear_cache()


def test_launch_without_cuda_takes_tritons_path():
    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    launch_mod.launch(FakeKernel(), (2, 1), [torch.zeros(4), 5], dict(BLOCK=8))
    assert len(calls) == 1 and calls[0][0] == (2, 1) and calls[0][1][1] == 5 and calls[0][2] == dict(BLOCK=8)
    assert not launch_mod._CACHE


@pytest.mark.gpu
def test_cached_launches_match_the_first_and_a_misaligned_view_compiles_its_own():
    """Forward+backward three times: the first through Triton's path, the others through the
    cache (counted), all bit-identical. Then u as a view 2 bytes off alignment: a new entry, and
    still the fp32 reference's result."""
    from mambakit.ops import selective_scan, selective_scan_ref
    from tests.scan_inputs import make_scan_inputs
    launch_mod.clear_cache()
    kw = {k: v.cuda() for k, v in make_scan_inputs(2, 64, 200, 16, with_init=True).items()}
    kw = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    hits = {"n": 0}

    def run_once(inputs):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y, h = selective_scan(**leaves, delta_softplus=True, return_final_state=True, backend="triton")
        (y.float().square().sum() + h.sum()).backward()
        return [y, h] + [leaves[k].grad for k in sorted(leaves)]

    first = run_once(kw)
    assert launch_mod._CACHE, "the first launch left no cache entry"
    for key, entry in list(launch_mod._CACHE.items()):
        run = entry[0]

        def counting(*a, run=run):
            hits["n"] += 1
            return run(*a)
        launch_mod._CACHE[key] = (counting,) + entry[1:]  # same kernel, names and defaults
    for _ in range(2):
        again = run_once(kw)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    assert hits["n"] >= 4, f"expected forward and backward from the cache twice, got {hits['n']} cached launches"
    entries = len(launch_mod._CACHE)
    wide = torch.zeros(2, 64, 201, device="cuda", dtype=torch.bfloat16)
    wide[:, :, 1:] = kw["u"]
    shifted = dict(kw, u=wide[:, :, 1:])
    assert shifted["u"].data_ptr() % 16 != 0
    y, h = selective_scan(**shifted, delta_softplus=True, return_final_state=True, backend="triton")
    assert len(launch_mod._CACHE) > entries
    y_ref, h_ref = selective_scan_ref(**{k: v.float().cpu() for k, v in shifted.items()}, delta_softplus=True,
                                      return_final_state=True)
    torch.testing.assert_close(y.float().cpu(), y_ref, rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(h.cpu(), h_ref, rtol=3e-2, atol=5e-2)
