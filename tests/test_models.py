"""Vim backbone: structure, checkpoint loading, timm registry, the Δ record."""

import argparse
import contextlib

import pytest
import timm
import torch

import rmeeto
import rmeeto.reduction
from rmeeto.models import CheckpointError, VimConfig, VisionMamba, frozen_forward
from rmeeto.models.mamba import BiMamba
from rmeeto.ops import available_backends, use_backend

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_classes=7)


def tiny(**kw) -> VisionMamba:
    torch.manual_seed(0)
    return rmeeto.create_model("vim_demo", **{**TINY, **kw})


def test_published_variants_have_the_papers_shapes():
    for name, dim, params in [("vim_tiny", 192, 7.1e6), ("vim_small", 384, 25.8e6), ("vim_base", 768, 97.6e6)]:
        model = rmeeto.create_model(name)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - params) / params < 0.01, (name, n)
        assert model.pos_embed.shape == (1, 197, dim)
        assert model.layers[0].mixer.dt_rank == -(-dim // 16)


def test_state_dict_uses_the_public_checkpoint_names():
    keys = set(tiny().state_dict())
    mixer = {f"layers.0.mixer.{k}" for k in [
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "conv1d_b.weight", "conv1d_b.bias",
        "x_proj.weight", "x_proj_b.weight", "dt_proj.weight", "dt_proj.bias", "dt_proj_b.weight",
        "dt_proj_b.bias", "out_proj.weight", "A_log", "A_b_log", "D", "D_b"]}
    top = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
           "layers.0.norm.weight", "norm_f.weight", "head.weight", "head.bias"}
    assert mixer | top <= keys
    no_bias = ("in_proj", "x_proj", "x_proj_b", "out_proj")
    assert not any(k.endswith(f"{name}.bias") for k in keys for name in no_bias)


def test_any_size_and_middle_cls():
    model = tiny(img_size=48, patch_size=16, num_classes=3)
    state = model.embed(torch.randn(2, 3, 48, 48))
    assert state.hidden.shape == (2, 10, 32) and (state.cls_index == 4).all()
    assert torch.allclose(state.hidden[:, 4], (model.cls_token + model.pos_embed[:, 4])[0])
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)
    with pytest.raises(ValueError, match="patches"):
        model(torch.randn(1, 3, 64, 64))


def test_unknown_name_or_option_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'vim_huge'"):
        rmeeto.create_model("vim_huge")
    with pytest.raises(ValueError, match="embed_dimm"):
        rmeeto.create_model("vim_tiny", embed_dimm=3)


@pytest.mark.parametrize("layout", ["vim", "bare", "lightning"])
def test_checkpoint_roundtrip_is_exact(tmp_path, layout):
    src, dst = tiny(), tiny(drop_path_rate=0.0)
    torch.nn.init.normal_(dst.pos_embed)  # make sure loading changes something
    sd = src.state_dict()
    obj = {"vim": {"model": sd, "epoch": 3, "args": argparse.Namespace(model="vim")},
           "bare": sd,
           "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 1}}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    rmeeto.load_checkpoint(dst, path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_wrong_variant_names_file_key_and_shapes(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"model": tiny(embed_dim=48).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        rmeeto.load_checkpoint(tiny(), path)
    msg = str(err.value)
    assert "small.pth" in msg and "'cls_token'" in msg
    assert "(1, 1, 48)" in msg and "(1, 1, 32)" in msg and "embed dim 48" in msg


def test_missing_keys_and_corrupt_files(tmp_path):
    sd = tiny().state_dict()
    del sd["norm_f.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing.*'norm_f.weight'"):
        rmeeto.load_checkpoint(tiny(), tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        rmeeto.load_checkpoint(tiny(), tmp_path / "junk.pth")
    (tmp_path / "random.pth").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                        generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(CheckpointError) as err:
        rmeeto.load_checkpoint(tiny(), tmp_path / "random.pth")
    message = str(err.value)
    assert "random.pth" in message and "\n" not in message and "weights_only" not in message
    with pytest.raises(CheckpointError, match="not found"):
        rmeeto.load_checkpoint(tiny(), tmp_path / "nope.pth")


def test_timm_registry_builds_the_same_model(tmp_path):
    src = tiny()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = timm.create_model("vim_demo_patch8_64", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")),
                              img_size=32, depth=3, embed_dim=32, num_classes=7)
    expected = VimConfig(**{**vars(rmeeto.models.VARIANTS["vim_demo"]), **TINY})
    assert isinstance(model, VisionMamba) and model.cfg == expected
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.pretrained_cfg["file"] == str(tmp_path / "w.pth") and "paper_top1" not in model.pretrained_cfg


def test_every_public_checkpoint_is_a_timm_pretrained_tag_with_the_papers_numbers():
    tags = timm.list_pretrained("vim_*") + timm.list_pretrained("videomamba_*")
    assert "vim_small_patch16_224_midclstok.in1k" in tags and "vim_small_patch16_224_midclstok.rmeeto_r11" in tags
    assert "videomamba_tiny_k400_f8.k400" in tags
    for name in tags:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id and (cfg.hf_hub_filename or cfg.hf_hub_subfolder), name
        assert cfg.paper_top1 is not None and 50 < cfg.paper_top1 < 90, name
        rmeeto.models.registry.resolve_name(name)  # every tag's architecture is a known variant
    small = timm.models.get_pretrained_cfg("vim_small_patch16_224_midclstok")  # the default tag
    assert (small.hf_hub_id, small.hf_hub_filename, small.paper_top1) == (
        "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", 80.5)
    retrained = timm.models.get_pretrained_cfg("vim_small_patch16_224_midclstok.rmeeto_r11")
    assert retrained.paper_gflops < small.paper_gflops and retrained.reduction == {"method": "rmeeto", "r": 11}


def test_models_carry_timm_pretrained_cfg_without_paper_numbers_unless_loaded_from_the_registry(tmp_path):
    model = rmeeto.create_model("vim_small_patch16_224_midclstok.rmeeto_r11", depth=2)
    cfg = model.pretrained_cfg
    assert cfg["tag"] == "rmeeto_r11" and cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert "paper_top1" not in cfg  # random init: the paper's 79.9 would be a lie
    assert timm.data.resolve_data_config(model=model)["std"] == timm.data.IMAGENET_DEFAULT_STD
    with pytest.raises(CheckpointError, match="vim_demo_patch8_64: no public checkpoint"):
        rmeeto.create_model("vim_demo", pretrained=True)


def _mixer_pair() -> tuple[BiMamba, BiMamba]:
    """Two mixers whose forward and backward parameters are swapped."""
    torch.manual_seed(1)
    a, b = BiMamba(16, d_state=4), BiMamba(16, d_state=4)
    sa = a.state_dict()
    swap = {}
    for k, v in sa.items():
        if k.startswith(("conv1d", "x_proj", "dt_proj")):
            name, rest = k.split(".", 1)
            other = name[:-2] if name.endswith("_b") else name + "_b"
            swap[f"{other}.{rest}"] = v
        elif k in ("A_log", "A_b_log", "D", "D_b"):
            swap[{"A_log": "A_b_log", "A_b_log": "A_log", "D": "D_b", "D_b": "D"}[k]] = v
        else:
            swap[k] = v
    b.load_state_dict(swap)
    return a, b


def test_backward_branch_scans_the_flipped_sequence_and_records_in_sequence_order():
    a, b = _mixer_pair()
    a.record = b.record = True
    x = torch.randn(2, 9, 16)
    ya, yb = a(x), b(x.flip(1))
    torch.testing.assert_close(ya, yb.flip(1), rtol=1e-5, atol=1e-6)
    ra, rb = a.last_record, b.last_record
    torch.testing.assert_close(ra.delta[0], rb.delta[1].flip(-1))
    torch.testing.assert_close(ra.delta[1], rb.delta[0].flip(-1))
    assert ra.delta[0].shape == (2, 32, 9) and ra.B[0].shape == (2, 4, 9) and (ra.delta[0] > 0).all()


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_a_mixer_with_gradients_is_one_autograd_node_on_the_cpu_kernels(monkeypatch):
    """With gradients on the cpu backend a mixer's two directions are one mamba_inner_cpu_grad call, with the
    per-direction path's output to the bit and its gradients to rounding (the second direction's ∂x and ∂z are
    added by the kernels, x_proj's input gradient by addmm), the scans' own parameters' to the bit (both
    directions' scan gradients from one kernel call); a mixer that records Δ, or under autocast, takes the
    per-direction path."""
    import rmeeto.models.mamba as mamba

    mixer = tiny(embed_dim=40).layers[0].mixer
    calls = []
    spy = mamba.mamba_inner_cpu_grad
    monkeypatch.setattr(mamba, "mamba_inner_cpu_grad", lambda *a: calls.append(1) or spy(*a))
    hidden = torch.randn(3, 9, 40, requires_grad=True)
    results = []
    with use_backend("cpu"):
        for record in (False, True):
            mixer.zero_grad()
            hidden.grad = None
            mixer.record = record
            out = mixer(hidden)
            out.square().sum().backward()
            results.append((out.detach(), hidden.grad, {n: p.grad for n, p in mixer.named_parameters()}))
        assert calls == [1]
        mixer.record = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixer(hidden)
        assert calls == [1]
    (out, g_hidden, grads), (want, want_hidden, want_grads) = results
    assert torch.equal(out, want)
    torch.testing.assert_close(g_hidden, want_hidden, rtol=1e-5, atol=1e-6 * want_hidden.abs().max().item())
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item())
    for name in ("A_log", "A_b_log", "D", "D_b", "dt_proj.bias", "dt_proj_b.bias"):  # the scans' own, from one call
        assert torch.equal(grads[name], want_grads[name]), name


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_backwards_one_after_another_give_their_own_gradients():
    """A mixer's backward takes its temporaries from memory kept from call to call (rmeeto.ops.workspace.kept):
    gradients handed out by one call stay as they were through the next, and a call gives what it gave before."""
    mixer = tiny(embed_dim=40).layers[0].mixer
    with use_backend("cpu"):
        def grads(hidden):
            hidden = hidden.clone().requires_grad_(True)
            mixer.zero_grad(set_to_none=True)
            mixer(hidden).square().sum().backward()
            return [hidden.grad, *(p.grad for p in mixer.parameters())]

        first_input, second_input = torch.randn(3, 9, 40), torch.randn(2, 12, 40)
        first = grads(first_input)
        kept = [g.clone() for g in first]
        second = grads(second_input)
        assert all(torch.equal(a, b) for a, b in zip(first, kept, strict=True))  # not overwritten by the second call
        assert all(torch.equal(a, b) for a, b in zip(grads(first_input), kept, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(grads(second_input), second, strict=True))


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
@pytest.mark.parametrize("method", [None, "rmeeto", "mtr"])
def test_vim_on_the_cpu_kernels_matches_ref(method):
    """The token-major cpu path (numba conv and reverse scans, no flipped copies) against the ref backend's
    flips: logits and every parameter gradient to 1e-5 relative, unreduced and reduced. Width 40 gives
    Dᵢ = 80, not a multiple of the kernels' 64 lanes."""
    model = tiny(embed_dim=40).train()
    if method:
        rmeeto.reduction.apply(model, method, r=4 if method == "rmeeto" else 0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    results = []
    for backend in ("cpu", "ref"):
        model.zero_grad()
        with use_backend(backend):
            logits = model(x)
            torch.nn.functional.cross_entropy(logits, y).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits, grads), (want_logits, want_grads) = results
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5 * want_logits.abs().max().item())
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())
    with torch.no_grad(), use_backend("cpu"):  # inference also fuses each residual add with its RMSNorm
        inference = model.eval()(x)
    torch.testing.assert_close(inference, want_logits, rtol=1e-5, atol=1e-5 * want_logits.abs().max().item())


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_frozen_prepares_the_mixers_parameters_once_and_again_after_a_change(monkeypatch):
    """Inside rmeeto.frozen the mixers lay out their parameters for the cpu kernels once: the same logits to
    the bit, and over two forwards half the layouts (none in the second). A parameter changed in place or given new data
    is laid out (or packed) again; a forward with gradients is unaffected; nesting keeps the outer scope, the exit ends
    it."""
    import rmeeto.models.mamba as mamba

    model = tiny(embed_dim=40).eval()
    rmeeto.reduction.apply(model, "rmeeto", r=4)
    x = torch.randn(2, 3, 32, 32)
    prepared = []
    prepare = mamba.prepare_inner
    monkeypatch.setattr(mamba, "prepare_inner", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    with torch.no_grad(), use_backend("cpu"):
        want = model(x)
        model(x)
        assert len(prepared) == 2 * len(model.layers)
        prepared.clear()
        with rmeeto.frozen(model):
            assert torch.equal(model(x), want) and torch.equal(model(x), want)
            assert len(prepared) == len(model.layers)
            mixer = model.layers[1].mixer
            mixer.A_b_log.add_(0.5)  # in place: its version counter moves
            mixer.conv1d.weight.data = mixer.conv1d.weight.data * 2  # new data: its address moves
            model.layers[0].mixer.out_proj.weight.mul_(1.5)  # alone in its mixer; packed for MKL (rmeeto.ops.packed)
            with rmeeto.frozen(model):
                changed = model(x)
            assert model.layers[0].mixer._prepared  # still frozen after the inner scope
        assert all(layer.mixer._prepared is None for layer in model.layers)
        assert torch.equal(changed, model(x)) and not torch.equal(changed, want)
    with rmeeto.frozen(model):
        model(x).sum().backward()
    assert model.layers[1].mixer.A_b_log.grad is not None


def test_frozen_lays_out_mamba_inner_cpus_parameters_only_for_the_cpu_backend(monkeypatch):
    """On the torch backend (as where numba is missing) a frozen forward packs the products' weights but never
    asks for mamba_inner_cpu's parameters (prepare_inner needs numba), and gives the unfrozen logits."""
    import rmeeto.models.mamba as mamba

    model = tiny(embed_dim=40).eval()
    x = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(mamba, "prepare_inner", lambda *a, **k: pytest.fail("prepare_inner called"))
    with torch.no_grad(), use_backend("torch"):
        want = model(x)
        with rmeeto.frozen(model):
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_frozen_reads_a_parametrized_weight_through_its_property():
    """A mixer weight under torch's parametrize (no longer in its module's parameter dict) is read by attribute inside
    frozen: the parametrized value, so the same logits to the bit as the unfrozen model's."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model = tiny(embed_dim=40).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), use_backend("cpu"):
        before = model(x)
        parametrize.register_parametrization(model.layers[1].mixer.x_proj_b, "weight", Double())
        want = model(x)
        with rmeeto.frozen(model):
            got = model(x)
    assert not torch.equal(want, before) and torch.equal(got, want)


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_frozen_calls_a_hooked_out_proj_as_a_module():
    """Inside frozen, an out_proj with a forward hook is called as a module (not by its packed weight): the hook
    runs in every block, and its change to the output shows in the logits."""
    model = tiny(embed_dim=40).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    with torch.no_grad(), use_backend("cpu"):
        want = model(x)
        for layer in model.layers:
            layer.mixer.out_proj.register_forward_hook(lambda m, i, out: calls.append(1) or out * 2)
        with rmeeto.frozen(model):
            got = model(x)
    assert len(calls) == len(model.layers) and not torch.allclose(got, want)


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
@pytest.mark.parametrize("tokens", [1, 2, 7])
def test_frozen_runs_each_mixer_as_one_kernel_call_with_the_same_bits(monkeypatch, tokens):
    """Inside rmeeto.frozen a mixer on the cpu backend is one mixer_cpu call (products, conv and scan in one numba
    kernel), down to a single token: the same output to the bit as outside, where several tokens go through
    mamba_inner_cpu (one token takes the general path: the ref backend's output to rounding). Under autocast it
    takes the usual path."""
    import rmeeto.models.mamba as mamba

    mixer = tiny(embed_dim=40).layers[0].mixer.eval()
    calls = []
    monkeypatch.setattr(mamba, "mixer_cpu", lambda *a, fn=mamba.mixer_cpu, **k: calls.append(1) or fn(*a, **k))
    hidden = torch.randn(3, tokens, 40)
    with torch.no_grad(), use_backend("cpu"):
        want = mixer(hidden)
        with use_backend("ref"):
            oracle = mixer(hidden)
        assert not calls
        with rmeeto.frozen(mixer):
            got = mixer(hidden)
            assert calls == [1]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixer(hidden)
            assert calls == [1]
    assert torch.equal(got, want) or tokens == 1
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_frozen_runs_each_block_as_one_kernel_call_unless_its_mixer_would_run_a_hook(monkeypatch):
    """Inside rmeeto.frozen a Vim's blocks and R-MeeTo's merges are one run_blocks call (one kernel call), with the
    same logits to the bit; with a block whose mixer has a forward hook each other block (add + RMSNorm, then the
    mixer) is one block_cpu call, and the hooked one calls its mixer as a module, so the hook runs; under a global
    module hook every block does."""
    import rmeeto.models.mamba as mamba

    model = tiny(embed_dim=40).eval()
    rmeeto.reduction.apply(model, "rmeeto", r=4)
    x = torch.randn(2, 3, 32, 32)
    calls, seen, whole = [], [], []
    monkeypatch.setattr(mamba, "block_cpu", lambda *a, fn=mamba.block_cpu, **k: calls.append(1) or fn(*a, **k))
    monkeypatch.setattr(frozen_forward, "run_blocks",
                        lambda *a, fn=frozen_forward.run_blocks: whole.append(1) or fn(*a))  # fmt: skip
    with torch.no_grad(), use_backend("cpu"):
        want = model(x)
        with rmeeto.frozen(model):
            assert torch.equal(model(x), want) and whole == [1] and not calls
            handle = model.layers[1].mixer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
            assert torch.equal(model(x), want) and len(calls) == len(model.layers) - 1 and len(seen) == 1
            assert whole == [1]
            handle.remove()
            handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m)))
            try:
                calls.clear()
                assert torch.equal(model(x), want) and not calls
            finally:
                handle.remove()
    assert seen.count(mamba.BiMamba) == len(model.layers)


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_frozen_checks_every_block_before_the_first_runs_and_calls_a_hooked_or_dropping_block_as_a_module(
    monkeypatch,
):
    """A frozen forward makes each block's checks (BiMamba.frozen_block) for all blocks before the first one runs,
    once per forward, and then runs the blocks without nn.Module.__call__: the same logits to the bit. A block with
    a forward pre-hook, or a DropPath in training mode, is called as a module: the hook runs, the path drops."""
    import rmeeto.models.mamba as mamba

    model = tiny(embed_dim=40, drop_path_rate=0.5).eval()
    rmeeto.reduction.apply(model, "rmeeto", r=4)
    x = torch.randn(2, 3, 32, 32)
    order = []
    monkeypatch.setattr(mamba.BiMamba, "frozen_block",
                        lambda self, norm, fn=mamba.BiMamba.frozen_block: order.append("check") or fn(self, norm))
    monkeypatch.setattr(mamba, "block_cpu", lambda *a, fn=mamba.block_cpu, **k: order.append("run") or fn(*a, **k))
    monkeypatch.setattr(frozen_forward, "run_blocks",
                        lambda *a, fn=frozen_forward.run_blocks: order.append("blocks") or fn(*a))  # fmt: skip
    depth = len(model.layers)
    with torch.no_grad(), use_backend("cpu"):
        want = model(x)
        with rmeeto.frozen(model):
            order.clear()
            assert torch.equal(model(x), want)
            assert order == ["check"] * depth + ["blocks"]
            seen = []
            handle = model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(module))
            order.clear()
            assert torch.equal(model(x), want) and seen == [model.layers[1]]
            assert order.count("run") == depth  # the hooked block still runs as one kernel call, from its forward
            handle.remove()
            model.layers[2].drop_path.train()
            dropped = model(x)
        assert not torch.equal(dropped, want)


def test_a_frozen_blocks_run_leaves_tensors_it_cannot_take_to_the_usual_path():
    """BiMamba.frozen_block's run gives None for a non-contiguous or fp64 hidden, or one that would record
    gradients, so that the block is called as a module; frozen_block itself is None outside frozen, or where its
    parameters would record gradients. Otherwise run gives the block's output to the bit."""
    model = tiny(embed_dim=40).eval()
    layer = model.layers[1]
    hidden = torch.randn(2, 40, 5).transpose(1, 2)
    with use_backend("cpu"):
        assert layer.mixer.frozen_block(layer.norm) is None
        with rmeeto.frozen(model):
            assert layer.mixer.frozen_block(layer.norm) is None  # its parameters want gradients
            model.requires_grad_(False)
            run = layer.mixer.frozen_block(layer.norm)
            if "cpu" not in available_backends():
                assert run is None
                return
            assert run(hidden, None) is None and run(hidden.contiguous().double(), None) is None
            assert run(hidden.contiguous().requires_grad_(), None) is None
            out, summed = run(hidden.contiguous(), None)
    with torch.no_grad(), use_backend("cpu"):
        normed, want_summed = layer.norm.add_forward(hidden.contiguous(), None)
        want = layer.mixer(normed)
    assert torch.equal(summed, want_summed) and torch.equal(out, want)


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_frozen_holds_the_inference_workspace_across_forwards(monkeypatch):
    """Inside rmeeto.frozen every forward takes its temporaries from one workspace, the one the scope holds
    (outside it each forward holds a new one, freed at its end; after the scope too), with the same logits to
    the bit as outside."""
    import rmeeto.models.mamba as mamba
    from rmeeto.ops.workspace import active

    model = tiny(embed_dim=40).eval()
    rmeeto.reduction.apply(model, "rmeeto", r=4)
    x = torch.randn(2, 3, 32, 32)
    used = []  # per forward, the workspaces its kernel calls used (kept alive: ids of freed objects can come back)
    monkeypatch.setattr(mamba, "mamba_inner_cpu",  # outside frozen, a call per block
                        lambda *a, fn=mamba.mamba_inner_cpu, **k: used[-1].append(a[3]) or fn(*a, **k))  # fmt: skip
    blocks_forward = frozen_forward._k.blocks_forward  # inside it, a call for all blocks
    monkeypatch.setattr(frozen_forward._k, "blocks_forward", lambda *a: used[-1].append(active()) or blocks_forward(*a))

    def forward() -> torch.Tensor:
        used.append([])
        return model(x)

    with torch.no_grad(), use_backend("cpu"):
        want, _ = forward(), forward()
        with rmeeto.frozen(model):
            got = [forward(), forward()]
        forward()
    apart, held, after = [set(map(id, ws)) for ws in used[:2]], [set(map(id, ws)) for ws in used[2:4]], used[4]
    assert [len(ws) for ws in used] == [len(model.layers)] * 2 + [1] * 2 + [len(model.layers)]
    assert all(len(ws) == 1 for ws in apart + held) and apart[0] != apart[1]
    assert held[0] == held[1] and id(after[0]) not in held[0]
    assert all(torch.equal(y, want) for y in got)


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
@pytest.mark.parametrize("method", [None, "rmeeto"])
def test_vim_inference_workspace_changes_no_logit_and_reuses_memory_across_blocks(method, monkeypatch):
    """Without gradients the mixers put their temporaries in one workspace held across the blocks
    (rmeeto.ops.workspace) and run both directions as one mamba_inner_cpu call: the logits are those of fresh
    memory and the general ops (up to dt_proj's summation order, which mamba_inner_cpu does in its scan), and
    every block gets in_proj's output at the same address."""
    import rmeeto.models.mamba as mamba

    x = torch.randn(2, 3, 32, 32)
    model = tiny(embed_dim=40).eval()  # Dᵢ = 80: a block of 64 channels and a ragged one
    if method:
        rmeeto.reduction.apply(model, method, r=4)
    with torch.no_grad(), use_backend("cpu"):
        reused = model(x)
        addresses = []
        matmul = mamba._matmul

        def recorded(*args):
            out = matmul(*args)
            addresses.append(out.data_ptr())
            return out

        monkeypatch.setattr(mamba, "_matmul", recorded)
        model(x)
        assert len(addresses) == 2 * len(model.layers) and len(set(addresses[::2])) == 1  # x, z per block
        monkeypatch.setattr(mamba, "reuse", contextlib.nullcontext)  # each temporary fresh, the general ops
        fresh = model(x)
    torch.testing.assert_close(reused, fresh, rtol=1e-5, atol=1e-6 * fresh.abs().max().item())


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_a_recording_mixer_runs_on_the_kernels_and_records_what_the_per_direction_ops_record(monkeypatch):
    """Without gradients a recording mixer (MTR's) runs as one kernel call too (mamba_inner_cpu with the workspace,
    block_cpu inside rmeeto.frozen) and makes its record from x_proj's outputs: the Δ, B and C that the
    per-direction ops (_scan, without the workspace) record, and the same logits, to rounding."""
    import rmeeto.models.mamba as mamba
    from rmeeto.ops import workspace

    x = torch.randn(2, 3, 32, 32)
    model = tiny(embed_dim=40).eval()  # Dᵢ = 80: a block of 64 channels and a ragged one
    rmeeto.reduction.apply(model, "mtr", r=0.1)
    recording = [layer.mixer for layer in model.layers if layer.mixer.record]
    calls = []
    for fn_name in ("selective_scan", "mamba_inner_cpu", "block_cpu"):
        monkeypatch.setattr(mamba, fn_name, lambda *a, fn=getattr(mamba, fn_name), fn_name=fn_name, **k:
                            calls.append((fn_name, workspace.active())) or fn(*a, **k))  # fmt: skip
    scopes = {"mamba_inner_cpu": contextlib.nullcontext, "block_cpu": lambda: rmeeto.frozen(model),
              "per-direction ops": contextlib.nullcontext}  # fmt: skip
    results = {}
    with torch.no_grad(), use_backend("cpu"):
        for name, scope in scopes.items():
            if name == "per-direction ops":  # each temporary fresh: no workspace, the general path
                monkeypatch.setattr(mamba, "reuse", contextlib.nullcontext)
            calls.clear()
            with scope():
                logits = model(x)
            records = [(*m.last_record.delta, *m.last_record.B, *m.last_record.C) for m in recording]
            results[name] = logits, [t for record in records for t in record], calls[:]
    want_logits, want, per_direction_calls = results.pop("per-direction ops")
    assert recording and len(want) == 6 * len(recording)
    assert [c for c, _ in per_direction_calls] == ["selective_scan"] * 2 * len(recording)  # others: ..._cpu_grad
    for kernel, (logits, got, kernel_calls) in results.items():
        assert kernel_calls == [(kernel, kernel_calls[0][1])] * len(model.layers), kernel  # one workspace for all
        assert isinstance(kernel_calls[0][1], workspace.Workspace)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6 * want_logits.abs().max().item())
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * w.abs().max().item())


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")
def test_vim_with_some_mixer_parameters_frozen_trains_on_the_cpu_kernels():
    """A mixer whose input and in_proj need no gradient, but whose dt_proj does, records a graph: it must not
    put its temporaries in the inference workspace (out= products cannot be differentiated, and the next
    block would overwrite what autograd saved). Gradients as with the ref backend."""
    model = tiny(embed_dim=40).train()
    model.requires_grad_(False)
    model.layers[0].mixer.dt_proj.requires_grad_(True)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for backend in ("cpu", "ref"):
        model.zero_grad()
        with use_backend(backend):
            model(x).sum().backward()
        grads.append(model.layers[0].mixer.dt_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * grads[1].abs().max().item())


def test_recording_is_off_by_default():
    model = tiny()
    model(torch.randn(1, 3, 32, 32))
    assert all(layer.mixer.last_record is None for layer in model.layers)


def test_stride8_vim_plus_variants_for_the_fine_tuned_checkpoints():
    """The "Vim+" checkpoints take overlapping 16×16 patches at stride 8: 27² + 1 tokens at 224."""
    import timm

    model = rmeeto.create_model("vim_tiny_patch16_stride8_224_midclstok.in1k_ft", img_size=64, depth=2)
    assert model.cfg.num_patches == 7 * 7 and model.pos_embed.shape == (1, 50, 192)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert rmeeto.models.registry.model_config("vim_small_stride8").num_patches == 27 * 27
    cfg = timm.models.get_pretrained_cfg("vim_small_patch16_stride8_224_midclstok.in1k_ft")
    assert cfg.hf_hub_filename == "vim_s_midclstok_ft_81p6acc.pth" and cfg.paper_top1 == 81.6
    with pytest.raises(ValueError, match="does not fit patches of 16 at stride 8"):
        model(torch.randn(1, 3, 60, 60))
