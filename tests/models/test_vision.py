"""Vision Mamba: the bidirectional mixer, the encoder with its scan orders, the image model and
its presets, position-embedding resizing, the video / point tokenizers feeding the encoder, and
the digits task."""

import json

import pytest
import torch

from mambakit.models.encoder import EncoderConfig, MambaEncoder
from mambakit.models.point_tokenizer import PointTokenizer, PointTokenizerConfig
from mambakit.models.scan_orders import cross_scan
from mambakit.models.video_tokenizer import TubeletConfig, TubeletTokenizer
from mambakit.models.vision import PRESETS, create_model, resize_pos_embed, resize_state_dict
from mambakit.modules.bimamba import BiMamba
from mambakit.modules.mamba import Mamba

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randomize(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter off its init, so that the two directions differ everywhere."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _single_mixers(bi: BiMamba) -> tuple[Mamba, Mamba]:
    """Two plain single-direction Mamba mixers holding the shared in/out proj and each
    direction's own parameters, copied by name."""
    mixers = []
    for backward in (False, True):
        m = Mamba(bi.d_model, d_state=bi.d_state, d_conv=bi.d_conv, expand=bi.d_inner // bi.d_model,
                  dt_rank=bi.dt_rank).to(bi.in_proj.weight.dtype)
        s = "_b" if backward else ""
        with torch.no_grad():
            m.in_proj.weight.copy_(bi.in_proj.weight)
            m.out_proj.weight.copy_(bi.out_proj.weight)
            m.conv1d.weight.copy_(getattr(bi, f"conv1d{s}").weight)
            m.conv1d.bias.copy_(getattr(bi, f"conv1d{s}").bias)
            m.x_proj.weight.copy_(getattr(bi, f"x_proj{s}").weight)
            m.dt_proj.weight.copy_(getattr(bi, f"dt_proj{s}").weight)
            m.dt_proj.bias.copy_(getattr(bi, f"dt_proj{s}").bias)
            m.A_log.copy_(bi.A_b_log if backward else bi.A_log)
            m.D.copy_(getattr(bi, f"D{s}"))
        mixers.append(m)
    return mixers[0], mixers[1]


# -- the bidirectional mixer -----------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
def test_bimamba_equals_two_single_direction_mixers(fused):
    bi = BiMamba(16, d_state=4, d_conv=3).double()
    _randomize(bi)
    fwd, bwd = _single_mixers(bi)
    h = torch.randn(2, 13, 16, dtype=torch.float64)
    with torch.no_grad():
        got = bi(h, fused=fused)
        want = (fwd(h) + bwd(h.flip(1)).flip(1)) / 2  # Vim: out_proj((y_f + flip(y_b)) / 2), out_proj linear
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        # the comparison sees a wrong direction: swapped parameters, or a backward pass not flipped
        assert not torch.allclose(got, (bwd(h) + fwd(h.flip(1)).flip(1)) / 2, atol=1e-3)
        assert not torch.allclose(got, (fwd(h) + bwd(h)) / 2, atol=1e-3)
        # the first token sees the future only through the backward direction
        h2 = h.clone()
        h2[:, -1] += 1.0
        assert not torch.allclose(bi(h2, fused=fused)[:, 0], got[:, 0])
        assert torch.allclose(fwd(h2)[:, 0], fwd(h)[:, 0])


def test_bimamba_without_divide_out_is_the_sum():
    bi = BiMamba(8, d_state=4, divide_out=False).double()
    _randomize(bi)
    fwd, bwd = _single_mixers(bi)
    h = torch.randn(1, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(bi(h), fwd(h) + bwd(h.flip(1)).flip(1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol,pad_to", [(torch.float64, 1e-10, None), (torch.float32, 2e-5, None),
                                              (torch.float64, 1e-10, 16)])
def test_fused_path_equals_reference_with_gradients(dtype, tol, pad_to):
    """pad_to=16: the fused path pads L = 21 to 32 with zero steps (what it does on CUDA), which
    must change neither the outputs nor any gradient."""
    bi = BiMamba(12, d_state=8).to(dtype)
    bi.pad_to = pad_to
    _randomize(bi, 0.2)
    h = torch.randn(3, 21, 12, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 21, 12, dtype=dtype)
    results = []
    for fused in (True, False):
        bi.zero_grad(set_to_none=True)
        h.grad = None
        out = bi(h, fused=fused)
        out.backward(grad_out)
        results.append((out.detach(), h.grad.clone(), {n: p.grad.clone() for n, p in bi.named_parameters()}))
    (o1, g1, p1), (o2, g2, p2) = results
    torch.testing.assert_close(o1, o2, rtol=tol, atol=tol)
    torch.testing.assert_close(g1, g2, rtol=tol, atol=tol)
    assert set(p1) == set(p2)
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], rtol=tol, atol=tol, msg=name)
        assert p1[name].abs().sum() > 0, name  # every parameter, both directions, gets a gradient


@pytest.mark.parametrize("backend,blocks", [("torch", 1), ("torch", 2), ("triton", 2)])
def test_inference_path_equals_the_training_path(backend, blocks, monkeypatch):
    """Without autograd the fused layer takes `_fused_inference` (in_proj's halves apart, the
    scan by blocks of the batch written over its input, the merge by blocks): the same outputs
    as the reference, and with the torch scan as the fused training path; with the Triton
    kernels (the interpreter on CPU) the scans write over their inputs in place."""
    from mambakit.ops import backend as backend_mod
    bi = BiMamba(12, d_state=8).to(DEVICE)
    bi.pad_to = 16
    bi.scan_block_bytes = 1 if blocks == 2 else 10**12  # two blocks: 2 sequences and 1
    _randomize(bi, 0.2)
    h = torch.randn(3, 21, 12, device=DEVICE)
    with torch.no_grad():
        want = bi(h, fused=False)
    real = backend_mod.resolve
    monkeypatch.setattr(backend_mod, "resolve", lambda b, x=None: backend if b is None else real(b, x))
    calls = []
    real_inference = bi._fused_inference
    monkeypatch.setattr(bi, "_fused_inference", lambda *a: calls.append(1) or real_inference(*a))
    monkeypatch.setattr(bi, "_triton_inference", lambda h: False)  # on CUDA: not the padded path
    with torch.no_grad():
        got = bi(h)
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    if backend == "torch":  # the training path under the interpreter would cost 10 s more
        trained = bi(h)  # with autograd
        torch.testing.assert_close(got, trained.detach(), rtol=2e-5, atol=2e-5)


def test_bimamba_bad_input():
    bi = BiMamba(8)
    with pytest.raises(ValueError, match=r"\(B, L, 8\)"):
        bi(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="no recurrent state"):
        bi(torch.randn(2, 5, 8), cache=object())
    with pytest.raises(ValueError, match="d_state"):
        BiMamba(8, d_state=0)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [4, 24])  # 24 x 384 rows: the tile of Vim-Ti's benchmark batches
def test_fused_bimamba_bf16_cuda_matches_reference(batch):
    torch.manual_seed(0)
    bi = BiMamba(192, d_state=16).cuda()
    h = torch.randn(batch, 197, 192, device="cuda")
    with torch.no_grad():
        want = bi(h, fused=False)  # the fp32 reference path
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = bi(h, fused=True)
            ref_bf16 = bi(h, fused=False)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max().item()
    ref_err = (ref_bf16.float() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-2 * want.abs().max().item(), (err, ref_err)
    torch.testing.assert_close(got.float(), ref_bf16.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_glue", ["1", "0"])
def test_fused_bimamba_cuda_gradients_match_reference(compile_glue, monkeypatch):
    """The fused path on CUDA (padding to 16, one conv and one scan call, and the stacking and
    merging of the two directions, torch.compile'd unless MAMBAKIT_COMPILE_GLUE=0) against two
    explicit single-direction scans: outputs and gradients, fp32, at an odd length."""
    monkeypatch.setenv("MAMBAKIT_COMPILE_GLUE", compile_glue)
    torch.manual_seed(0)
    bi = BiMamba(64, d_state=8).cuda()
    _randomize(bi, 0.1)
    h = torch.randn(2, 37, 64, device="cuda", requires_grad=True)
    params = [h, bi.in_proj.weight, bi.conv1d_b.weight, bi.A_b_log, bi.out_proj.weight]
    out = {}
    for fused in (True, False):
        y = bi(h, fused=fused)
        g = torch.randn(y.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        out[fused] = (y, torch.autograd.grad((y * g).sum(), params))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=6e-4, atol=2e-3)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=6e-4, atol=2e-3)


# -- the encoder and its scan orders ----------------------------------------------------------

def test_cross_scan_encoder_layer_is_the_mean_of_row_and_column_scans():
    h, w, d = 3, 4, 8
    enc = MambaEncoder(EncoderConfig(d_model=d, n_layer=1, d_state=4, n_paths=2)).double()
    _randomize(enc, 0.1)
    x = torch.randn(2, h * w, d, dtype=torch.float64)
    mixer = enc.layers[0].mixer
    with torch.no_grad():
        got = mixer(x, cross_scan(h, w))
        rows = mixer.paths[0](x)  # row-major: the tokens as stored
        cols_in = x.view(2, h, w, d).transpose(1, 2).reshape(2, h * w, d)  # column-major
        cols = mixer.paths[1](cols_in).view(2, w, h, d).transpose(1, 2).reshape(2, h * w, d)
        torch.testing.assert_close(got, (rows + cols) / 2, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="path"):
        enc(x, order=None)  # two paths need an order of two paths


def test_encoder_is_prenorm_residual_stack():
    """Block by block by hand: residual <- residual + hidden; hidden <- mixer(norm(residual))."""
    cfg = EncoderConfig(d_model=8, n_layer=3, d_state=4)
    enc = MambaEncoder(cfg).double()
    _randomize(enc, 0.1)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    pos = torch.randn(1, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        hidden, residual = x + pos, torch.zeros_like(x)
        for layer in enc.layers:
            residual = residual + hidden
            hidden = layer.mixer.paths[0](layer.norm(residual))
        torch.testing.assert_close(enc(x, pos), enc.norm_f(residual + hidden), rtol=1e-10, atol=1e-10)
        # keep: the final add and norm of one token only (a classifier's), negative indices too
        want = enc.norm_f(residual + hidden)
        for k in (0, 3, -1):
            torch.testing.assert_close(enc(x, pos, keep=k), want[:, k][:, None], rtol=1e-10, atol=1e-10)
    for k in (7, -8):
        with pytest.raises(ValueError, match="keep must index"):
            enc(x, pos, keep=k)


# -- the image model ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,low,high", [("vim_tiny", 6.5e6, 7.5e6), ("vim_small", 25e6, 27e6),
                                           ("vim_base", 96e6, 100e6)])
def test_presets_full_depth_parameter_counts(name, low, high):
    model = create_model(name)
    assert model.cfg.n_layer == 24 and model.cfg.patch_size == 16 and model.cfg.d_state == 16
    assert model.cfg.expand == 2
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high, n  # Vim's paper: Ti 7M, S 26M, B 98M


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_forward_and_backward_small(name):
    model = create_model(name, num_classes=5, img_size=32, n_layer=2)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    feats = model.forward_features(x)
    assert feats.shape == (2, 5, PRESETS[name].d_model)  # 4 patches + the class token
    logits.sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_patch_embedding_as_one_gemm_equals_the_conv():
    """The CUDA path's GEMM over flattened patches is the strided conv: (C, p, p)-major patch
    rows against the conv weight, in raster order, for non-square images too."""
    from mambakit.models.vision import PatchEmbed
    torch.manual_seed(0)
    pe = PatchEmbed((16, 24), 8, 3, 10).double()
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    want = pe.proj(x).flatten(2).transpose(1, 2)  # (B, 6, 10)
    torch.testing.assert_close(pe.as_gemm(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pe.as_gemm(x.contiguous(memory_format=torch.channels_last)), want,
                               rtol=1e-12, atol=1e-12)  # pixels in another layout
    assert not torch.allclose(pe.as_gemm(x.transpose(2, 3).reshape(2, 3, 16, 24)), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the copy casts the pixels to autocast's dtype
        got = pe.float().as_gemm(x.float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape,patch", [((2, 3, 32, 48), 16), ((1, 1, 16, 16), 8), ((2, 4, 8, 24), 4)])
def test_patchify_is_the_reshaped_permute(shape, patch):
    """The Triton patch-row copy (the CUDA patch embedding's) against reshape + permute, in the
    images' dtype and cast to bf16 (the interpreter truncates where the GPU rounds: one bf16
    ulp); images a view with a row stride past W."""
    from mambakit.ops.reference import patchify_ref
    from mambakit.ops.triton.patchify import patchify
    b, c, h, w = shape
    x = torch.randn(b, c, h, w + 3)[..., 1:w + 1].to(DEVICE)
    torch.testing.assert_close(patchify(x, patch), patchify_ref(x, patch), rtol=0, atol=0)
    torch.testing.assert_close(patchify(x, patch, torch.bfloat16).float(), patchify_ref(x, patch).float(),
                               rtol=2 ** -7, atol=0)
    with pytest.raises(ValueError, match="power of two dividing"):
        patchify(x, 3)
    with pytest.raises(ValueError, match="unit stride"):
        patchify(x.transpose(2, 3), patch)


def test_class_token_in_the_middle_and_patches_in_raster_order():
    model = create_model("vim_tiny", num_classes=3, img_size=(16, 24), patch_size=8, d_model=16, n_layer=1)
    x = torch.randn(2, 3, 16, 24)
    tokens, pos = model.tokens(x)
    m = 2 * 3
    assert model.cls_position == m // 2 == 3
    assert torch.equal(tokens[:, 3], model.cls_token[0].expand(2, -1))
    assert torch.equal(pos[0, 3], model.cls_pos_embed[0, 0])
    patch = x[:, :, 8:16, 0:8]  # the 4th patch in raster order (row 1, col 0) sits after the class token
    want = torch.einsum("bchw,dchw->bd", patch, model.patch_embed.proj.weight) + model.patch_embed.proj.bias
    torch.testing.assert_close(tokens[:, 4], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True),
                       model.forward_features(x)[:, 3])


def test_cross_scan_and_mean_pool_models_run():
    for kw in ({"scan": "cross"}, {"pool": "mean"}):
        model = create_model("vim_tiny", num_classes=4, img_size=32, patch_size=8, d_model=16, n_layer=2, **kw)
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 4)
        out.sum().backward()


def test_bad_vision_input():
    model = create_model("vim_tiny", num_classes=2, img_size=32, d_model=16, n_layer=1)
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_model("vim_tiny", img_size=30)
    with pytest.raises(ValueError, match="unknown vision model"):
        create_model("vim_huge")
    with pytest.raises(ValueError, match="unknown VisionConfig field"):
        create_model("vim_tiny", depth=3)
    with pytest.raises(ValueError, match="scan"):
        create_model("vim_tiny", scan="zigzag")


# -- position embeddings at another image size ------------------------------------------------------

def test_resize_pos_embed_identity_and_constants():
    pos = torch.randn(1, 16, 8)
    assert torch.equal(resize_pos_embed(pos, (4, 4)), pos)
    const = torch.ones(1, 16, 1) * torch.randn(1, 1, 8)  # the same vector at every cell
    torch.testing.assert_close(resize_pos_embed(const, (7, 5)), const[:, :1].expand(1, 35, 8))
    # bicubic over the 2-D grid, not over the flat sequence: a function of the row alone stays one
    rows = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1)  # value = row index
    out = resize_pos_embed(rows, (8, 6)).view(8, 6)
    assert torch.allclose(out, out[:, :1].expand(8, 6))  # constant along each new row
    assert (out[1:, 0] >= out[:-1, 0] - 1e-6).all()  # and increasing with the row
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 15, 8), (4, 4))


def test_load_state_dict_resizes_pos_embed_and_keeps_class_token():
    small = create_model("vim_tiny", num_classes=3, img_size=32, patch_size=8, d_model=16, n_layer=1)
    big = create_model("vim_tiny", num_classes=3, img_size=48, patch_size=8, d_model=16, n_layer=1)
    same = create_model("vim_tiny", num_classes=3, img_size=32, patch_size=8, d_model=16, n_layer=1)
    same.load_state_dict(small.state_dict())  # same size: an exact copy
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(same(x), small(x))
    big.load_state_dict(small.state_dict())
    assert torch.equal(big.cls_pos_embed, small.cls_pos_embed)
    torch.testing.assert_close(big.pos_embed, resize_pos_embed(small.pos_embed, (6, 6)))
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    src = small.state_dict()
    state = resize_state_dict(src, (6, 6))
    assert state["pos_embed"].shape == (1, 36, 16) and src["pos_embed"].shape == (1, 16, 16)  # a copy
    assert all(state[k] is src[k] for k in src if k != "pos_embed")


# -- other tokenizers feed the same encoder -------------------------------------------------------

def test_video_and_point_tokens_feed_the_encoder():
    enc = MambaEncoder(EncoderConfig(d_model=16, n_layer=2, d_state=4))
    video = TubeletTokenizer(TubeletConfig(frames=4, img_size=16, tubelet=2, patch_size=8, in_chans=3, dim=16))
    tokens, pos = video(torch.randn(2, 3, 4, 16, 16))
    out = enc(tokens, pos, video.order())
    assert out.shape == (2, 8, 16)
    # the time-first path: tokens gathered into that order, scanned, and put back
    out_t = enc(tokens, pos, video.order((1, 2, 0)))
    assert out_t.shape == out.shape and not torch.allclose(out_t, out)
    points = PointTokenizer(PointTokenizerConfig(dim=16, num_groups=8, group_size=4, hidden=8))
    xyz = torch.randn(2, 40, 3)
    p = points(xyz)
    out = enc(p["tokens"], p["pos"])
    assert out.shape == (2, 8, 16)
    out.sum().backward()
    assert all(q.grad is not None for q in points.parameters())


# -- the digits task ------------------------------------------------------------------------------

def test_digits_task_runs_and_writes_its_outputs(tmp_path):
    pytest.importorskip("sklearn")
    from mambakit.tasks.digits import train_main
    rc = train_main(["--out-dir", str(tmp_path), "--max-steps", "4", "--d-model", "16", "--n-layer", "1",
                     "--d-state", "4", "--batch-size", "16", "--eval-every", "2", "--threads", "0",
                     "--no-progress"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    conf = torch.tensor(metrics["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == metrics["n_test"] == 360
    assert abs(conf.diag().sum().item() / 360 - metrics["test_accuracy"]) < 1e-9
    assert metrics["n_train"] + metrics["n_test"] == 1797
    assert (tmp_path / "confusion.png").stat().st_size > 1000


@pytest.mark.slow
def test_digits_default_run_reaches_95_percent(tmp_path):
    """The README's claim, the whole default run: about 80 s on 2 idle cores."""
    pytest.importorskip("sklearn")
    from mambakit.tasks.digits import train_main
    threads = torch.get_num_threads()
    try:
        assert train_main(["--out-dir", str(tmp_path), "--no-progress"]) == 0  # sets 2 threads
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    print(f"digits: test accuracy {metrics['test_accuracy']:.4f} in {metrics['seconds']:.0f} s")
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["steps"] == 1000 and metrics["threads"] == 2


def test_digits_split_and_shift():
    pytest.importorskip("sklearn")
    from mambakit.tasks.digits import confusion_matrix, load_split, shift_images
    a = load_split(0.2, 0)
    b = load_split(0.2, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # fixed seeded split
    y_te = a[3]
    assert torch.bincount(y_te).min() >= 35  # stratified: every class about 36 times
    x = torch.arange(16.0).view(1, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    shifted = shift_images(x.expand(50, 1, 4, 4), gen, 1)
    assert shifted.shape == (50, 1, 4, 4)
    # every output pixel is the input pixel one step away (or the background 0)
    for s in shifted:
        diffs = {(i - j) for i, j in zip(s.flatten().tolist(), x.flatten().tolist()) if i != 0}
        assert len(diffs) <= 1
    assert confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2).tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="test-fraction"):
        load_split(1.5, 0)
