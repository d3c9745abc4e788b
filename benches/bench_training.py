"""Training throughput and quality: `sae_models.training.train` against SAELens (CPU) or EleutherAI's
sparsify (GPU), on the same data.

Both trainers fit a TopK SAE of the paper's size (d_in 1280, 5120 features, k = 10) with Adam at lr 1e-4
and batches of 4096 vectors, on the SAME synthetic activations in the SAME order, for the same number of
tokens; then both SAEs are scored on the same held-out set with ONE formula written here (not either
library's own metric):

    FVU = sum (x - x_hat)^2 / sum (x - mean(x))^2      (mean per dimension over the held-out set)

The two trainers run in two threads that compute in turn, one training step each (a baton passed in the
data iterator: only one computes at any time), so both see the same machine conditions on this noisy
2-core machine; `--sequential` runs them one after the other instead. Printed: tokens/s of each trainer
over its whole `train()` / `fit()` call (its own computing time, setup included) and from its median
step (time from taking a batch to asking for the next), FVU, L0 and never-firing features on the
held-out set, and the ratios (ours / SAELens tokens/s; FVU ours - SAELens).

Data (no data set can be downloaded here): SAE-like activations, made deterministically from a seed: a
random dictionary of 4096 unit vectors in 1280-d; each vector is a sparse non-negative combination of
them (Bernoulli firing with Zipf-like frequencies, about 12 active on average, exponential magnitudes)
plus a fixed offset and Gaussian noise (5% of the signal variance), fp32. The whole training stream is
generated before either trainer starts (so generation time is in neither figure) and kept in memory
(`--tokens` x 1280 x 4 bytes).

SAELens is driven through its own trainer (`sae_lens.SAETrainer` with a `TopKTrainingSAE`, the same
path as its synthetic-data runner): its loss, AuxK, dead-feature tracking, Adam and grad clipping are
its own. The options that cannot be made equal are printed at the start of each run.

Setup (a separate venv outside the repo; this machine caps torch at 2.14.1; tested with sae-lens 6.54.12):

    python3 -m venv /work/venv-saelens
    /work/venv-saelens/bin/pip install torch==2.14.1
    /work/venv-saelens/bin/pip install -c <(echo torch==2.14.1) sae-lens safetensors numpy pytest einops pillow

Run from the repo root:

    /work/venv-saelens/bin/python benches/bench_training.py [--tokens 524288] [--threads 2] [--rounds 1]
        [--eval-tokens 32768] [--seed 0] [--profile-steps 0] [--saelens-b-dec zero|geometric-median]
        [--dead-window-steps N] [--sequential]

On a GPU (`--device cuda`) the other trainer is sparsify's `SparseCoder` (eai-sparsify on PyPI; tested
with 1.3.3) in the training step of its `Trainer`, written out here (its package `__init__` imports the
trainer's dependencies, transformers, datasets and accelerate, so only `sparsify.sparse_coder` is imported;
where `accelerate`, `transformers`, `huggingface_hub` or `natsort` is missing, a stand-in module provides the
names that module imports, none of which the step uses; the run prints which). Its step, as `Trainer.fit`:
`b_dec` = mean of the first batch; decoder rows to unit norm; forward with the dead mask (its AuxK:
k_aux = d_in // 2, dead after 10M tokens without firing) under its own bfloat16 autocast; loss `fvu +
auxk_alpha * auxk_loss` (auxk_alpha 1/32, as ours); backward; gradient parallel to the decoder rows removed;
Adam (lr 1e-4); the dead-latent counters; its per-step read of the FVU for logging. Setup on a machine with
no network: carry the wheels of eai-sparsify, simple-parsing, docstring-parser and natsort and install them
with `pip install --no-deps`; einops, safetensors and (for its Triton decoder) triton come with torch's
CUDA image. The GPU runs are sequential (one GPU), the order alternating over rounds; the training data
live on the GPU for both. Our trainer takes `--step-path` and `--matmul`.

    python benches/bench_training.py --device cuda --tokens 8388608 [--matmul fp32|tf32|bf16] [--rounds 2]

`--rounds N` repeats the pair N times, alternating which trainer goes first, and reports the median
ratio. `--profile-steps N` (N > 0) afterwards runs our trainer for N
steps under torch.profiler and prints the top operators by CPU time. `--saelens-b-dec geometric-median`
starts SAELens's b_dec where ours starts (its own init is zero); the default keeps SAELens's own init.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bar
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import warnings  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")

D_IN = 1280
N_FEATURES = 5120
K = 10
BATCH = 4096
LR = 1e-4

# our trainer's documented defaults that matter for the comparison (see sae_models.training.TrainConfig)
OURS_AUXK = 256
OURS_AUXK_COEF = 1 / 32
OURS_EPS = 6.25e-10


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
class SyntheticActivations:
    """Deterministic SAE-like activations: x = offset + sum_i a_i d_i + noise, a_i >= 0 sparse."""

    def __init__(self, seed: int, d_in: int = D_IN, n_true: int = 4096, mean_active: float = 12.0,
                 noise_frac: float = 0.05):
        g = torch.Generator().manual_seed(seed)
        self.d_in = d_in
        self.dictionary = torch.randn(n_true, d_in, generator=g)
        self.dictionary /= self.dictionary.norm(dim=-1, keepdim=True)
        rank = torch.randperm(n_true, generator=g).float()
        p = 1.0 / (rank + 20.0) ** 0.8
        self.p = (p * (mean_active / p.sum())).clamp(max=0.5)
        self.offset = torch.randn(d_in, generator=g) * (2.0 / math.sqrt(d_in))  # norm ~2
        # per-dimension signal variance ~ E[#active] E[a^2] / d_in, with a ~ Exp(1) + 0.25
        signal_var = float(self.p.sum()) * (1.0 + 1.25 ** 2) / d_in
        self.noise_std = math.sqrt(noise_frac * signal_var)

    def batch(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        fire = torch.rand(n, self.p.numel(), generator=g) < self.p
        rows, cols = fire.nonzero(as_tuple=True)  # row-major: rows ascending
        vals = torch.empty(cols.numel()).exponential_(1.0, generator=g) + 0.25
        counts = torch.bincount(rows, minlength=n)
        offsets = torch.zeros(n, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)[:-1]
        x = torch.nn.functional.embedding_bag(cols, self.dictionary, offsets, mode="sum",
                                              per_sample_weights=vals)
        x += self.offset
        x += torch.randn(n, self.d_in, generator=g) * self.noise_std
        return x.contiguous()

    def batches(self, n_tokens: int, batch: int, seed: int) -> list[torch.Tensor]:
        return [self.batch(batch, seed * 1_000_003 + i) for i in range(n_tokens // batch)]


class Baton:
    """Lets two trainers, each in its own thread, compute in turn: one step of one, then one step of the
    other, so that both see the same machine conditions (only the holder computes; the other waits)."""

    def __init__(self, first: str, second: str):
        self.other = {first: second, second: first}
        self.holder = first
        self.done: set[str] = set()
        self.cv = threading.Condition()

    def acquire(self, name: str):
        with self.cv:
            self.cv.wait_for(lambda: self.holder == name or self.other[name] in self.done)
            self.holder = name

    def pass_on(self, name: str):
        with self.cv:
            if self.other[name] not in self.done:
                self.holder = self.other[name]
                self.cv.notify_all()

    def finish(self, name: str):
        with self.cv:
            self.done.add(name)
            self.holder = self.other[name]
            self.cv.notify_all()


class TimedIterator:
    """Yields the given batches in order, noting the time between taking one batch and asking for the next
    (one training step), and the time the trainer computed (held the baton, when there is one)."""

    def __init__(self, batches, name: str | None = None, baton: Baton | None = None):
        self.batches = batches
        self.name, self.baton = name, baton
        self.i = 0
        self.steps: list[float] = []
        self.held_s = 0.0
        self._acquired = None
        self._returned = None

    def start(self):
        if self.baton:
            self.baton.acquire(self.name)
        self._acquired = time.perf_counter()

    def stop(self):
        self.held_s += time.perf_counter() - self._acquired
        if self.baton:
            self.baton.finish(self.name)

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= len(self.batches):
            raise StopIteration
        now = time.perf_counter()
        if self._returned is not None:
            self.steps.append(now - self._returned)
        if self.baton:
            self.held_s += now - self._acquired
            self.baton.pass_on(self.name)
            self.baton.acquire(self.name)
            self._acquired = time.perf_counter()
        b = self.batches[self.i]
        self.i += 1
        self._returned = time.perf_counter()
        return b

    def median_step_s(self) -> float:
        # skip the first steps: warm-up, and our trainer takes 10 batches at once for its data statistics
        skip = min(16, len(self.steps) // 4)
        d = self.steps[skip:]
        return statistics.median(d) if d else float("nan")


def run_pair(order, jobs, interleave: bool):
    """Run the two trainers (`jobs[name](iterator) -> (sae, info)`), step by step in turn if `interleave`,
    else one after the other in `order`."""
    baton = Baton(*order) if interleave else None
    its = {name: TimedIterator(jobs[name][0], name, baton) for name in order}
    out, errors = {}, {}

    def work(name):
        try:
            out[name] = jobs[name][1](its[name])
        except BaseException as e:  # reported in the main thread
            errors[name] = e
            if baton and name not in baton.done:
                baton.finish(name)

    if interleave:
        threads = [threading.Thread(target=work, args=(name,)) for name in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for name in order:
            work(name)
    for name, e in errors.items():
        raise RuntimeError(f"{name} trainer failed") from e
    for name in order:
        sae, info = out[name]
        it = its[name]
        info.update({"wall_s": it.held_s, "batches_taken": it.i, "median_step_s": it.median_step_s(),
                     "mean_step_s": statistics.mean(it.steps[min(16, len(it.steps) // 4):]) if it.steps
                     else float("nan")})
    return out


# ---------------------------------------------------------------------------------------------------
# one formula for both SAEs
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def score(reconstruct, encode, eval_batches) -> dict:
    """FVU (per-dimension centred), L0 and the fraction of never-firing features, in float64 sums."""
    device = eval_batches[0].device
    sq_err = 0.0
    s1 = torch.zeros(D_IN, dtype=torch.float64, device=device)
    s2 = torch.zeros(D_IN, dtype=torch.float64, device=device)
    n = 0
    l0_sum = 0.0
    fired = torch.zeros(N_FEATURES, dtype=torch.bool, device=device)
    for x in eval_batches:
        x_hat = reconstruct(x).to(torch.float64)
        xd = x.to(torch.float64)
        sq_err += float((xd - x_hat).pow(2).sum())
        s1 += xd.sum(0)
        s2 += xd.pow(2).sum(0)
        n += x.shape[0]
        active = encode(x) > 0
        l0_sum += float(active.sum())
        fired |= active.any(0)
    total = float((s2 - s1.pow(2) / n).sum())
    return {"fvu": sq_err / total, "mse": sq_err / (n * D_IN), "l0": l0_sum / n,
            "never_fired": 1.0 - float(fired.float().mean())}


# ---------------------------------------------------------------------------------------------------
# the two trainers
# ---------------------------------------------------------------------------------------------------
def run_ours(it: TimedIterator, tokens: int, seed: int, device: str = "cpu", step_path: str = "auto",
             matmul: str = "fp32"):
    from sae_models.training import train

    last = {}

    def callback(d):
        last.update(d)

    it.start()
    try:
        sae = train(it, n_features=N_FEATURES, k=K, auxk=OURS_AUXK, auxk_coef=OURS_AUXK_COEF, batch_size=BATCH,
                    lr=LR, eps=OURS_EPS, architecture="topk", max_tokens=tokens, seed=seed, device=device,
                    callback=callback, step_path=step_path, matmul=matmul)
        _sync(device)
    finally:
        it.stop()
    sae.eval()
    return sae, {"tokens": tokens, "last_log": dict(last),
                 "setting": f"step path {sae.config.hyperparameters['step_path']}, matmul {matmul}"}


def _sync(device: str) -> None:
    """Wait for the GPU's queue, so that a trainer's time includes all of its work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- sparsify ------------------------------------------------------------------------------------------
SPARSIFY_AUXK_ALPHA = 1 / 32
SPARSIFY_DEAD_TOKENS = 10_000_000  # its default dead_feature_threshold, the same as ours
_STAND_INS = {"accelerate.utils": ("send_to_device",), "transformers": ("PreTrainedModel",),
              "huggingface_hub": ("snapshot_download",), "natsort": ("natsorted",)}


def import_sparsify(device: str = "cuda"):
    """`(SparseCoder, SparseCoderConfig, decoder name, stand-ins used)` from sparsify's `sparse_coder` module
    without running its package `__init__`; None when sparsify is not installed. On the CPU its Triton
    decoder cannot run: its own switch SPARSIFY_DISABLE_TRITON picks its eager one."""
    import importlib.machinery
    import importlib.util
    import types

    if torch.device(device).type != "cuda":
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    if "sparsify" not in sys.modules:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            return None
        pkg = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
        sys.modules["sparsify"] = pkg
    stand_ins = []
    for name, attrs in _STAND_INS.items():
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            continue  # the real module
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                sys.modules[sub] = types.ModuleType(sub)
                sys.modules[sub].__spec__ = importlib.machinery.ModuleSpec(sub, None)
        for attr in attrs:
            setattr(sys.modules[name], attr, None)
        stand_ins.append(name)
    from sparsify import utils
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    return SparseCoder, SparseCoderConfig, utils.decoder_impl.__name__, stand_ins


def run_sparsify(it: TimedIterator, tokens: int, seed: int, device: str):
    SparseCoder, SparseCoderConfig, decoder, _ = import_sparsify(device)
    it.start()
    try:
        torch.manual_seed(seed)
        sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=N_FEATURES, k=K), device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=LR)
        since_fired = torch.zeros(N_FEATURES, dtype=torch.long, device=device)
        did_fire = torch.zeros(N_FEATURES, dtype=torch.bool, device=device)
        fvu_sum, steps = 0.0, 0
        for x in it:
            if steps == 0:
                sae.b_dec.data = x.mean(0).to(sae.dtype)
            sae.set_decoder_norm_to_unit_norm()
            dead_mask = since_fired > SPARSIFY_DEAD_TOKENS
            total_variance = (x - x.mean(0)).pow(2).sum()
            out = sae(x, dead_mask=dead_mask, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            fvu_sum += float(out.fvu.detach())  # its trainer reads the FVU back every step for its log
            (out.fvu + SPARSIFY_AUXK_ALPHA * out.auxk_loss).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                since_fired += x.shape[0]
                since_fired[did_fire] = 0
                did_fire.zero_()
            steps += 1
        _sync(device)
    finally:
        it.stop()
    sae.eval()
    # its forward runs under autocast("cuda", bfloat16) where the GPU supports bfloat16; on the CPU in fp32
    bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
    setting = f"decoder {decoder}, forward in {'bf16 (its autocast)' if bf16 else 'fp32'}"
    return _SparsifyModel(sae), {"tokens": steps * BATCH, "setting": setting,
                                 "train_fvu_mean": fvu_sum / max(steps, 1)}


class _SparsifyModel:
    """sparsify's SAE behind the two calls `score` makes."""

    def __init__(self, sae):
        self.sae = sae

    @torch.no_grad()
    def __call__(self, x):
        return self.sae(x).sae_out.float()

    @torch.no_grad()
    def encode(self, x):
        acts, idx, _ = self.sae.encode(x)
        return torch.zeros(x.shape[0], N_FEATURES, device=x.device).scatter_(1, idx, acts.float())


def saelens_available() -> bool:
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        return False
    return True


def saelens_config(tokens: int, dead_window_steps: int):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    sae_cfg = TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=N_FEATURES, k=K, dtype="float32", device="cpu",
        apply_b_dec_to_input=True, normalize_activations="none",
        aux_loss_coefficient=OURS_AUXK_COEF,       # same weight on the AuxK term as ours
        rescale_acts_by_decoder_norm=True,        # its default: acts as if the decoder rows were unit-norm
        use_sparse_activations=False,
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=tokens, train_batch_size_samples=BATCH, lr=LR, lr_end=LR,
        lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, device="cpu", autocast=False,
        dead_feature_window=dead_window_steps, feature_sampling_window=10 ** 9,
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2 ** 31 - 1),
    )
    return sae_cfg, trainer_cfg


def run_saelens(it: TimedIterator, tokens: int, seed: int, dead_window_steps: int, b_dec_init=None):
    import functools

    import sae_lens.training.sae_trainer as trainer_module
    from sae_lens.training.sae_trainer import SAETrainer

    trainer_module.tqdm = functools.partial(trainer_module.tqdm, disable=True)  # its progress bar only
    from sae_lens.saes.topk_sae import TopKTrainingSAE

    sae_cfg, trainer_cfg = saelens_config(tokens, dead_window_steps)
    it.start()
    try:
        torch.manual_seed(seed)  # SAELens initialises from torch's global generator
        sae = TopKTrainingSAE(sae_cfg)
        if b_dec_init is not None:
            with torch.no_grad():
                sae.b_dec.copy_(b_dec_init)
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=it)
        sae = trainer.fit()
    finally:
        it.stop()
    sae.eval()
    return sae, {"tokens": tokens, "dead_at_end": int(trainer.dead_neurons.sum())}


def describe_differences(dead_window_steps: int, steps: int, saelens_b_dec: str) -> list[str]:
    """What could not be made the same between the two runs (SAELens side read from its installed source,
    ours from sae_models.training.recipe's docstring)."""
    lines = [
        f"AuxK: ours top auxk={OURS_AUXK} dead latents, loss normalised by the residual's variance; SAELens fixes "
        f"k_aux = d_in // 2 = {D_IN // 2} and scales by min(n_dead / k_aux, 1), unnormalised; both coefficient 1/32.",
        f"Dead latents: ours after 10M tokens without firing ({dead_window_steps} steps); SAELens set to the same "
        f"{dead_window_steps} steps (dead_feature_window)."
        + (f" This run has {steps} steps, so no latent can be dead and AuxK is inactive in both." 
           if steps <= dead_window_steps else ""),
        "Decoder norm: ours renormalises decoder rows to unit norm every step and projects the parallel "
        "gradient out; SAELens TopK uses rescale_acts_by_decoder_norm=True (pre-acts times ||W_dec row||, "
        "codes divided by it: equivalent to unit-norm rows, no renormalisation).",
        "Init: ours W_enc uniform +-1/sqrt(d_in), W_dec = W_enc rows scaled to unit norm, b_dec = geometric "
        "median of the first 32768 vectors; SAELens W_dec kaiming-uniform rows scaled to norm 0.1 "
        "(decoder_init_norm), W_enc = W_dec^T, b_enc = 0, b_dec = "
        + ("0 (its own init; sae-lens 6 has no b_dec init option)." if saelens_b_dec == "zero" else
           "geometric median of the same 32768 vectors, set by this bench before fit() (--saelens-b-dec)."),
        "Optimiser: both Adam(0.9, 0.999), lr 1e-4 constant, fp32; eps ours 6.25e-10, SAELens torch's 1e-8 "
        "(not an option); SAELens clips the gradient norm to 1.0 (hard-coded), ours does not clip.",
        "Loss scale: ours mean over elements times 1/variance of the first 10 batches; SAELens sum over dims, "
        "mean over tokens (Adam makes the scale matter little, but it interacts with SAELens's clipping).",
        "RNG: different initial weights (each library's own init from the same seed); the data are identical.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------------
def profile_ours(train_batches, steps: int, seed: int, device: str = "cpu", step_path: str = "auto",
                 matmul: str = "fp32"):
    from torch.profiler import ProfilerActivity, profile

    from sae_models.training import train

    sub = train_batches[:steps]
    gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=False) as prof:
        train(iter(sub), n_features=N_FEATURES, k=K, auxk=OURS_AUXK, auxk_coef=OURS_AUXK_COEF, batch_size=BATCH,
              lr=LR, eps=OURS_EPS, architecture="topk", max_tokens=steps * BATCH, seed=seed, device=device,
              step_path=step_path, matmul=matmul)
        _sync(device)
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    print(f"\n== torch.profiler: our trainer, {steps} steps (sorted by {sort}) ==")
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def fmt_rate(tokens, seconds):
    return tokens / seconds if seconds and seconds == seconds else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2 ** 19, help="training tokens for each trainer")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens for the FVU")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dead-window-steps", type=int, default=None,
                    help="SAELens dead_feature_window in steps (default: our trainer's window in steps if it "
                         "exposes one, else SAELens's default 1000)")
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--sequential", action="store_true",
                    help="run the two trainers one after the other instead of step by step in turn")
    ap.add_argument("--device", default="cpu", help="cpu (against SAELens) or cuda (against sparsify)")
    ap.add_argument("--against", choices=("saelens", "sparsify"), default=None,
                    help="the other trainer (default: saelens on the CPU, sparsify on a GPU)")
    ap.add_argument("--step-path", choices=("auto", "cpu", "gpu"), default="auto", help="our trainer's step")
    ap.add_argument("--matmul", choices=("fp32", "tf32", "bf16"), default="fp32", help="our trainer's products")
    ap.add_argument("--saelens-b-dec", choices=("zero", "geometric-median"), default="zero",
                    help="SAELens's b_dec at the start: its own init (zero), or the geometric median of the "
                         "first 32768 training vectors as ours (computed before its timer starts)")
    args = ap.parse_args()
    device = args.device
    other = args.against or ("sparsify" if torch.device(device).type == "cuda" else "saelens")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")

    if other == "saelens" and not saelens_available():
        sys.exit("sae-lens is not installed in this interpreter; set up /work/venv-saelens as the docstring "
                 "of benches/bench_training.py says and run with /work/venv-saelens/bin/python.")
    if other == "sparsify" and import_sparsify(device) is None:
        sys.exit("sparsify is not installed in this interpreter: pip install --no-deps eai-sparsify "
                 "simple-parsing docstring-parser natsort (see the docstring of benches/bench_training.py)")
    try:
        import sae_models.training  # noqa: F401
    except ImportError as e:
        sys.exit(f"sae_models.training cannot be imported: {e}")

    torch.set_num_threads(args.threads)
    tokens = max(BATCH, args.tokens // BATCH * BATCH)
    dead_window = args.dead_window_steps or our_dead_window_steps() or 1000

    if other == "saelens":
        import sae_lens

        versions = f"sae-lens {sae_lens.__version__}"
    else:
        from importlib.metadata import version

        *_, decoder, stand_ins = import_sparsify(device)
        versions = (f"eai-sparsify {version('eai-sparsify')} (decoder {decoder}; stand-in modules: "
                    f"{', '.join(stand_ins) or 'none'})")
    gpu = f", {torch.cuda.get_device_name()}" if torch.device(device).type == "cuda" else ""
    print(f"torch {torch.__version__}, {versions}, threads {torch.get_num_threads()}, device {device}{gpu}")
    print(f"TopK SAE d_in={D_IN} n_features={N_FEATURES} k={K}; batch {BATCH}, Adam lr {LR:g}; "
          f"{tokens} training tokens ({tokens // BATCH} steps) each, {args.eval_tokens} held-out tokens")
    if other == "saelens":
        print("Differences that cannot be removed:")
        for line in describe_differences(dead_window, tokens // BATCH, args.saelens_b_dec):
            print("  - " + line)

    t0 = time.perf_counter()
    data = SyntheticActivations(seed=args.seed)
    train_batches = [b.to(device) for b in data.batches(tokens, BATCH, seed=args.seed + 1)]
    eval_batches = [b.to(device) for b in data.batches(max(BATCH, args.eval_tokens // BATCH * BATCH), BATCH,
                                                       seed=args.seed + 2)]
    print(f"data generated in {time.perf_counter() - t0:.1f} s "
          f"(noise std {data.noise_std:.4f}, mean active {float(data.p.sum()):.1f})")

    saelens_b_dec = None
    if args.saelens_b_dec == "geometric-median":
        from sae_models.training import geometric_median

        saelens_b_dec = geometric_median(torch.cat(train_batches[: 32768 // BATCH]).cpu())

    jobs = {"ours": (train_batches, lambda it: run_ours(it, tokens, args.seed, device, args.step_path, args.matmul))}
    if other == "saelens":
        jobs["saelens"] = (train_batches, lambda it: run_saelens(it, tokens, args.seed, dead_window, saelens_b_dec))
    else:
        jobs["sparsify"] = (train_batches, lambda it: run_sparsify(it, tokens, args.seed, device))
    on_gpu = torch.device(device).type == "cuda"
    rows = []
    for r in range(args.rounds):
        order = ["ours", other] if r % 2 == 0 else [other, "ours"]
        res = run_pair(order, jobs, interleave=not (args.sequential or on_gpu))
        for name in order:
            sae, info = res[name]
            info.update(score(sae, sae.encode, eval_batches))
            if name == "ours":
                try:
                    from sae_models.metrics import evaluate

                    info["fvu_sae_models_metrics"] = evaluate(sae, eval_batches)["fvu"]
                except Exception as e:  # a cross-check only
                    info["fvu_sae_models_metrics"] = f"n/a ({e.__class__.__name__})"
            info["tok_s"] = fmt_rate(info["tokens"], info["wall_s"])
            info["tok_s_step"] = fmt_rate(BATCH, info["median_step_s"])
            print(f"round {r + 1} {name:8s}: {info['wall_s']:.1f} s computing, {info['tok_s']:.0f} tok/s "
                  f"(median step {info['median_step_s']:.4f} s = {info['tok_s_step']:.0f} tok/s, mean step "
                  f"{info['mean_step_s']:.4f} s), FVU {info['fvu']:.4f}, L0 {info['l0']:.2f}, "
                  f"batches taken {info['batches_taken']}" + (f"; {info['setting']}" if "setting" in info else ""))
            res[name] = info
        rows.append(res)

    print("\n== results (held-out FVU by the one formula above) ==")
    hdr = f"{'round':>5} {'trainer':8} {'tok/s (call)':>13} {'tok/s (step)':>13} {'FVU':>8} {'MSE':>10} " \
          f"{'L0':>6} {'never fired':>12}"
    print(hdr)
    for r, res in enumerate(rows):
        for name in ("ours", other):
            i = res[name]
            print(f"{r + 1:>5} {name:8} {i['tok_s']:>13.0f} {i['tok_s_step']:>13.0f} {i['fvu']:>8.4f} "
                  f"{i['mse']:>10.3e} {i['l0']:>6.2f} {i['never_fired']:>12.3f}")
    ratio_call = [res["ours"]["tok_s"] / res[other]["tok_s"] for res in rows]
    ratio_step = [res["ours"]["tok_s_step"] / res[other]["tok_s_step"] for res in rows]
    dfvu = [res["ours"]["fvu"] - res[other]["fvu"] for res in rows]
    print(f"\nthroughput ours/{other} (whole call): {statistics.median(ratio_call):.2f}x  "
          f"(per round: {', '.join(f'{x:.2f}' for x in ratio_call)})")
    print(f"throughput ours/{other} (median step): {statistics.median(ratio_step):.2f}x  "
          f"(per round: {', '.join(f'{x:.2f}' for x in ratio_step)})")
    print(f"FVU ours - {other}: {statistics.median(dfvu):+.4f}   "
          f"(ours {rows[0]['ours']['fvu']:.4f}, {other} {rows[0][other]['fvu']:.4f})")
    print(f"cross-check, sae_models.metrics.evaluate FVU of ours: {rows[0]['ours']['fvu_sae_models_metrics']}")
    if "dead_at_end" in rows[0].get("saelens", {}):
        print(f"SAELens dead features at the end (its own {dead_window}-step window): "
              f"{rows[0]['saelens']['dead_at_end']}; ours last log: {rows[0]['ours']['last_log']}")

    if args.profile_steps > 0:
        profile_ours(train_batches, args.profile_steps, args.seed, device, args.step_path, args.matmul)


def our_dead_window_steps() -> int | None:
    """Our trainer's dead-feature window in steps, if its options (`TrainConfig`) expose it as a token count."""
    import inspect

    from sae_models.training import TrainConfig

    params = inspect.signature(TrainConfig).parameters
    for name in ("dead_toks_threshold", "dead_tokens", "dead_feature_tokens", "dead_after_tokens", "dead_window_tokens"):
        if name in params and isinstance(params[name].default, int):
            return max(1, params[name].default // BATCH)
    for name in ("dead_steps", "dead_feature_window", "dead_window_steps"):
        if name in params and isinstance(params[name].default, int):
            return params[name].default
    return None


if __name__ == "__main__":
    main()
