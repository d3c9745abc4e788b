"""The pack's cost inside the sampler's hot path, counted on the CPU with a TorchDispatchMode that sees every
ATen operation: real ComfyUI sampling (2 steps, CFG, so every call has cond and uncond rows) of the tiny SDXL
and FLUX models, the pack's every edit kind against the same sampling of the plain model.

On a GPU each operation that reads a value back to the host (`_local_scalar_dense`: `.item()`, `bool(t)`,
`float(t)`; `nonzero`; boolean-mask indexing) stalls the launch queue, and a tensor made from a Python list
(`lift_fresh`) is a host-to-device copy. On the CPU every device is the host, so this checks the code path, not
the time: inside a call of the diffusion model the pack adds none of them, and outside it at most one read a
step (the step's non-finite check). A second count bounds the operations each hooked block adds, per mode.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_patching import make_sae

AUTO = "auto (the SAE's block)"
STEPS = 2
SYNC = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
        "aten::unique_consecutive", "aten::_unique2", "aten::equal"}
FROM_HOST = {"aten::lift_fresh", "aten::lift_fresh_copy"}
# Operations that only make views or move nothing: not counted as work.
FREE = {"aten::detach", "aten::alias", "aten::lift_fresh"}


class Count(TorchDispatchMode):
    """Counts ATen operations by name, separately inside the diffusion model's forward and outside it."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.inside, self.calls = 0, 0
        self.ops = {True: Counter(), False: Counter()}
        self.work = Counter()  # inside: operations that compute (not views)
        self._hooks = [diffusion_model.register_forward_pre_hook(self._enter),
                       diffusion_model.register_forward_hook(self._leave)]

    def _enter(self, *a):
        self.inside += 1
        self.calls += 1

    def _leave(self, *a):
        self.inside -= 1

    def close(self):
        for h in self._hooks:
            h.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        inside = self.inside > 0
        self.ops[inside][name] += 1
        if inside and not func.is_view and name not in FREE:
            self.work[name] += 1
        return func(*args, **(kwargs or {}))

    def syncs(self, inside: bool) -> int:
        return sum(n for op, n in self.ops[inside].items() if op in SYNC)

    def from_host(self, inside: bool) -> int:
        return sum(n for op, n in self.ops[inside].items() if op in FROM_HOST)


def counted(model, run) -> Count:
    """Run `run()` twice (the first fills what edits make once per device and grid), count the second."""
    run()
    mode = Count(model.model.diffusion_model)
    try:
        with mode:
            run()
    finally:
        mode.close()
    return mode


def sdxl_run(tiny, m):
    import comfy.sample

    latent = torch.zeros(2, 4, 16, 16)  # a batch of 2, with CFG: 4 rows a call
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    pos, neg = tiny.tiny_conditioning("a cat"), tiny.tiny_conditioning("")
    return lambda: comfy.sample.sample(m, noise, STEPS, 3.0, "euler", "normal", pos, neg, latent, denoise=1.0,
                                       disable_pbar=True, seed=1)


def flux_run(flux, m):
    import comfy.sample

    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    pos, neg = flux.tiny_flux_conditioning("a cat on a mat"), flux.tiny_flux_conditioning("")
    return lambda: comfy.sample.sample(m, noise, STEPS, 2.0, "euler", "simple", pos, neg, latent, denoise=1.0,
                                       disable_pbar=True, seed=1)


def painted_mask():
    mask = torch.zeros(2, 64, 64)
    mask[0, :32, :32] = 1.0
    mask[1, 16:, :] = 0.5
    return mask


def steered(pk, model, h, mode, target="cond", mask=None, strength=2.0, start=0.0, end=1.0):
    node = pk.N["UnboxSteerFeatures"]
    return node.execute(model, h, "3, 7:1.5", strength, mode, AUTO, "mean activation", start, end, target,
                        mask=mask).args[0]


def probed(pk, model, h, target="both"):
    return pk.N["UnboxProbeBlock"].execute(model, h, AUTO, "all", target).args[0]


def dumped(pk, model, block, fields="update, input, output"):
    """(The test's `output_dir` fixture points ComfyUI's output folder at a temporary folder.)"""
    node = pk.N["UnboxDumpActivations"]
    return node.execute(model, "hot", block, "all", "both", fields, "float32", 256, "").args[0]


def reconstructed(pk, model, h, mask=None):
    return pk.N["UnboxReconstructBlock"].execute(model, h, AUTO, False, 0.0, 1.0, "both", mask=mask).args[0]


# (name, how to patch the MODEL, the most ATen operations one hooked block call may add; measured on the tiny
# SDXL model: add 2 = the write (add_, or addcmul_ with a mask) and the finite check (one vector_norm); the
# paper's paint on base 3 (one write per sign); replace 2 (the input plus the icon vector written into the
# output, the check); encoding edits (ablate, set, reconstruct, probe) the update (sub), the encoder (linear,
# topk, relu, ...), their few products and one write; dump 6 (the update and the copies it keeps))
CASES = [
    ("probe", lambda pk, m, h: probed(pk, m, h), 9),
    ("add", lambda pk, m, h: steered(pk, m, h, "add"), 2),
    ("add, mask", lambda pk, m, h: steered(pk, m, h, "add", mask=painted_mask()), 2),
    ("add, cond +, uncond -", lambda pk, m, h: steered(pk, m, h, "add", target="cond +, uncond -"), 3),
    ("add, steps 1-", lambda pk, m, h: steered(pk, m, h, "add", target="both", start=0.5), 2),
    ("ablate", lambda pk, m, h: steered(pk, m, h, "ablate", strength=1.0), 15),
    ("set, mask", lambda pk, m, h: steered(pk, m, h, "set", mask=painted_mask()), 15),
    ("replace", lambda pk, m, h: steered(pk, m, h, "replace", target="both"), 2),
    ("replace, mask", lambda pk, m, h: steered(pk, m, h, "replace", mask=painted_mask()), 3),
    ("reconstruct", lambda pk, m, h: reconstructed(pk, m, h), 14),
    ("dump", lambda pk, m, h: dumped(pk, m, h.sae.config.block), 6),
]


def check(pk, plain: Count, patched: Count, name: str, bound: int):
    assert patched.calls == plain.calls
    # inside the diffusion model: no read from the device, no tensor from a host list, beyond the plain model's
    assert patched.syncs(inside=True) == plain.syncs(inside=True), (name, patched.ops[True])
    assert patched.from_host(inside=True) == plain.from_host(inside=True), name
    # outside it: at most one read per sampling step
    assert patched.syncs(inside=False) - plain.syncs(inside=False) <= STEPS, (name, patched.ops[False])
    added = sum(patched.work.values()) - sum(plain.work.values())
    per_block_call = added / patched.calls
    print(f"{name}: {per_block_call:.1f} operations per hooked block call")
    assert per_block_call <= bound, (name, per_block_call, patched.work - plain.work)


@pytest.fixture(scope="module")
def plain_sdxl(tiny, model):
    return counted(model, sdxl_run(tiny, model))


@pytest.mark.parametrize("name, patch, bound", CASES, ids=[c[0] for c in CASES])
def test_sdxl_edits_add_no_host_sync_inside_the_unet(pk, tiny, model, plain_sdxl, output_dir, name, patch, bound):
    m = patch(pk, model, make_sae(pk, block="mid.0"))
    check(pk, plain_sdxl, counted(m, sdxl_run(tiny, m)), name, bound)


@pytest.fixture(scope="module")
def fmodel(comfyui_path):
    import tiny_flux

    model = tiny_flux.tiny_flux_model(seed=0)
    return tiny_flux, model, counted(model, flux_run(tiny_flux, model))


FLUX_CASES = [c for c in CASES if c[0] in ("probe", "add", "add, mask", "ablate", "dump")]


@pytest.mark.parametrize("block", ["double.18", "single.5"])
@pytest.mark.parametrize("name, patch, bound", FLUX_CASES, ids=[c[0] for c in FLUX_CASES])
def test_flux_edits_add_no_host_sync_inside_the_transformer(pk, fmodel, output_dir, block, name, patch, bound):
    flux, model, plain = fmodel
    m = patch(pk, model, make_sae(pk, block=block, d=64, n=128))
    check(pk, plain, counted(m, flux_run(flux, m)), name, bound)


def test_the_non_finite_check_still_names_the_node_and_block(pk, tiny, model):
    """The check moved out of the hooks (one read per step): an edit that overflows still stops the run,
    naming the node and the block."""
    h = make_sae(pk, block="mid.0")
    with torch.no_grad():
        h.sae.W_dec.mul_(1e38)
    m = steered(pk, model, h, "add", strength=1000.0)
    with pytest.raises(pk.patch.NonFiniteEdit, match=r"^SAE Steer Features: the edit of block mid.0 \(middle_block.1\) "
                                                    r"made the block's output non-finite"):
        sdxl_run(tiny, m)()


def test_the_gpu_bench_runs_and_its_profile_agrees(comfyui_path):
    """benches/bench_gpu.py with --smoke (tiny models on the CPU): the script runs end to end, and torch.profiler
    sees what the counts above see: the patched configurations read from the device (aten::_local_scalar_dense)
    at most once per step more than the plain model."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "benches" / "bench_gpu.py"), "--smoke", "--reps", "1",
                        "--groups", "sdxl1,flux"], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "COMFYUI_PATH": str(comfyui_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^(\S.*?)\s+\|\s+[\d.]+ ms \|\s+([\d.]+) \| (\d+), (\d+), (\d+), (\d+)$", r.stdout, re.M)
    names = [name for name, *_ in rows]
    assert names == ["plain", "probe x4", "add x4", "ablate x4", "dump x4", "plain", "probe x1", "add x1",
                     "ablate x1"], r.stdout
    for group in (rows[:5], rows[5:]):
        plain_items = int(group[0][3])
        for name, _, _, items, _, _ in group[1:]:
            assert int(items) <= plain_items + 1, (name, items, plain_items)  # 1 step: at most one more read
