"""An independent check against the paper's code: the paper hooks diffusers' `FluxTransformer2DModel`
(its flux_integration branch, SDLens/cache_and_edit/hooks.py: the image stream's output minus its input
on `transformer_blocks.18`; on a single-stream block, the tokens after the text). The same weights, mapped
into diffusers with ComfyUI's own key conversion (`comfy.utils.flux_to_diffusers`), go through the pack's
probe and dump nodes in ComfyUI: both must see the same update, and the probe the SAE codes of it.

diffusers 0.34.0 is the version the paper's code pins (`.ci/run` installs it).
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from test_flux import D, make_sae

diffusers_flux = pytest.importorskip("diffusers.models.transformers.transformer_flux",
                                     reason="diffusers is not installed (.ci/run installs diffusers==0.34.0)")

AUTO = "auto (the SAE's block)"
N_TXT, H, W = 6, 4, 4  # text tokens; the 4x4 grid of 2x2 patches of an 8x8 latent


def to_diffusers(comfy_flux) -> torch.nn.Module:
    """diffusers' FluxTransformer2DModel with the weights of ComfyUI's `comfy_flux`."""
    import comfy.utils

    dm = comfy_flux.model.diffusion_model
    p = dm.params
    sd = dm.state_dict()
    out = {}
    mapping = comfy.utils.flux_to_diffusers({"depth": p.depth, "depth_single_blocks": p.depth_single_blocks,
                                             "hidden_size": p.hidden_size})
    for key, src in mapping.items():
        if isinstance(src, str):
            if src in sd:
                out[key] = sd[src]
            continue
        name, piece = src[0], src[1]
        if name not in sd:
            continue
        out[key] = src[2](sd[name]) if piece is None else sd[name].narrow(*piece)
    model = diffusers_flux.FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels * 4, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed,
        axes_dims_rope=tuple(p.axes_dim))
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def paper_update(model, block: str, inputs: dict) -> torch.Tensor:
    """The update the paper's hooks read on `block`, `[1, H, W, C]`."""
    kind, i = block.split(".")
    seen = {}
    if kind == "double":  # edit_streams_hook, stream "image": output[1] (the image) minus kwargs["hidden_states"]
        def hook(module, args, kwargs, output):
            seen["u"] = output[1] - kwargs["hidden_states"]
        module = model.transformer_blocks[int(i)]
    else:  # stream "image" of a single block: the tokens after the text (the paper fixes 512; here 6)
        def hook(module, args, kwargs, output):
            seen["u"] = output[:, N_TXT:] - kwargs["hidden_states"][:, N_TXT:]
        module = model.single_transformer_blocks[int(i)]
    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, return_dict=False)
    finally:
        handle.remove()
    return rearrange(seen["u"], "b (h w) c -> b h w c", h=H, w=W)


@pytest.fixture(scope="module")
def both(comfyui_path):
    import tiny_flux

    comfy_flux = tiny_flux.tiny_flux_model(seed=4)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 2 * H, 2 * W, generator=g), torch.randn(1, N_TXT, tiny_flux.CONTEXT_DIM, generator=g)
    y, t = torch.randn(1, tiny_flux.VEC_DIM, generator=g), torch.tensor([0.7])
    ids = torch.zeros(H, W, 3)
    ids[..., 1], ids[..., 2] = torch.arange(H)[:, None], torch.arange(W)[None, :]
    diffusers_inputs = dict(hidden_states=rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2),
                            encoder_hidden_states=context, pooled_projections=y, timestep=t,
                            img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(N_TXT, 3))
    return comfy_flux, to_diffusers(comfy_flux), (x, t, context, y), diffusers_inputs


def run_comfy(model, call):
    x, t, context, y = call
    dm = model.model.diffusion_model
    with torch.no_grad():  # the diffusion model's call, with the MODEL's wrappers (the pack's patch), as a sampler
        return dm(x, t, context, y, transformer_options={"wrappers": model.wrappers})


@pytest.mark.parametrize("block", ["double.18", "single.20"])
def test_the_pack_sees_the_update_the_papers_hooks_see(pk, output_dir, both, block):
    from test_dump import dump_node, fake_images, read_shards, save_images

    comfy_flux, paper_model, call, inputs = both
    expected = paper_update(paper_model, block, inputs)  # [1, 4, 4, D]
    h = make_sae(pk, block, seed=6)
    probed, probes = pk.N["UnboxProbeBlock"].execute(comfy_flux, h, AUTO, "all", "cond").args
    dumped, dump = dump_node(pk, probed, output_dir / "vs_paper", blocks=block)
    plain = run_comfy(comfy_flux, call)
    assert torch.equal(run_comfy(dumped, call), plain)  # probing and dumping change nothing
    save_images(pk, fake_images(1, size=2 * H * 8), dump)
    rows = read_shards(output_dir / "vs_paper", block)["update"]
    assert rows.shape == (H * W, D)
    assert torch.allclose(rows, expected.reshape(-1, D), atol=1e-5, rtol=1e-5)
    # the probe's codes are the SAE's codes of that update
    record = probes[0].get(-1)
    dense = h.sae.encode(expected)
    for f in range(h.sae.n_features):
        assert torch.allclose(record.feature_map(f), dense[..., f], atol=1e-4), f
