"""Write the example workflows in `example_workflows/` (ComfyUI's UI format, as its frontend saves them).

The workflows are data; this script is how they are kept consistent. Run it after changing a node's
widgets: `python scripts/make_example_workflows.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_names import example_path  # noqa: E402
from model_files import CHECKPOINT_NAME as CHECKPOINT  # noqa: E402
from model_files import FLUX_SAE_FOLDER, SDXL_BASE_NAME  # noqa: E402
from model_files import PAPER_SAE_FOLDERS as PAPER_SAES  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "example_workflows"
AUTO = "auto (the SAE's block)"

# Output sockets of the node types used here: (name, type).
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "UNETLoader": [("MODEL", "MODEL")],
    "DualCLIPLoader": [("CLIP", "CLIP")],
    "VAELoader": [("VAE", "VAE")],
    "CLIPTextEncodeFlux": [("CONDITIONING", "CONDITIONING")],
    "EmptySD3LatentImage": [("LATENT", "LATENT")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "SolidMask": [("MASK", "MASK")],
    "MaskComposite": [("MASK", "MASK")],
    "UnboxLoadSAE": [("SAE", "SAE")],
    "UnboxSteerFeatures": [("MODEL", "MODEL")],
    "UnboxReconstructBlock": [("MODEL", "MODEL")],
    "UnboxProbeBlock": [("MODEL", "MODEL"), ("probe", "SAE_PROBE")],
    "UnboxFeatureHeatmap": [("overlay", "IMAGE"), ("heat", "MASK")],
    "UnboxTopFeatures": [("grid", "IMAGE"), ("json", "STRING")],
    "UnboxPromptList": [("prompt", "STRING"), ("seed", "INT"), ("index", "INT"), ("count", "INT")],
    "UnboxDumpActivations": [("MODEL", "MODEL"), ("dump", "SAE_DUMP")],
    "UnboxDumpImages": [],
    "UnboxTrainSAE": [("SAE", "SAE")],
    "UnboxPaintedMask": [("MASK", "MASK")],
    "UnboxFindFeatures": [("json", "STRING"), ("grid", "IMAGE"), ("heatmaps", "IMAGE")],
}
# Socket (non-widget) inputs: (name, type).
INPUTS = {
    "CLIPTextEncode": [("clip", "CLIP")],
    "CLIPTextEncodeFlux": [("clip", "CLIP")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "SaveImage": [("images", "IMAGE")],
    "MaskComposite": [("destination", "MASK"), ("source", "MASK")],
    "UnboxSteerFeatures": [("model", "MODEL"), ("sae", "SAE"), ("mask", "MASK")],
    "UnboxReconstructBlock": [("model", "MODEL"), ("sae", "SAE"), ("mask", "MASK")],
    "UnboxProbeBlock": [("model", "MODEL"), ("sae", "SAE"), ("probe", "SAE_PROBE")],
    "UnboxFeatureHeatmap": [("probe", "SAE_PROBE"), ("image", "IMAGE")],
    "UnboxTopFeatures": [("probe", "SAE_PROBE"), ("image", "IMAGE"), ("mask", "MASK")],
    "UnboxDumpActivations": [("model", "MODEL")],
    "UnboxDumpImages": [("images", "IMAGE"), ("dump", "SAE_DUMP"), ("prompt", "STRING"), ("seed", "INT")],
    "UnboxFindFeatures": [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("sae", "SAE")],
}
# Widgets that a workflow may drive from a link instead (the frontend's "widget converted to input").
WIDGET_SOCKETS = {"CLIPTextEncode": [("text", "STRING")], "KSampler": [("seed", "INT")]}


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, widgets, pos, title=None, **inputs):
        """Add a node; `inputs` map socket names to (node, output slot)."""
        nid = len(self.nodes) + 1
        node = {
            "id": nid, "type": type_, "pos": list(pos), "size": [320, 60 + 26 * max(1, len(widgets))],
            "flags": {}, "order": nid - 1, "mode": 0,
            "inputs": [], "outputs": [],
            "properties": {"Node name for S&R": type_}, "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        for name, typ in INPUTS.get(type_, []):
            link = None
            if name in inputs:
                src, slot = inputs[name]
                link = len(self.links) + 1
                self.links.append([link, src["id"], slot, nid, len(node["inputs"]), typ])
                src["outputs"][slot]["links"].append(link)
            node["inputs"].append({"name": name, "type": typ, "link": link})
        for name, typ in WIDGET_SOCKETS.get(type_, []):
            if name in inputs:
                src, slot = inputs[name]
                link = len(self.links) + 1
                self.links.append([link, src["id"], slot, nid, len(node["inputs"]), typ])
                src["outputs"][slot]["links"].append(link)
                node["inputs"].append({"name": name, "type": typ, "widget": {"name": name}, "link": link})
        node["outputs"] = [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(OUTPUTS[type_])]
        self.nodes.append(node)
        return node

    def to_json(self, title: str, note: str) -> dict:
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"title": title, "description": note}, "version": 0.4,
        }


def base(g: Graph, prompt: str, x=0, checkpoint=CHECKPOINT, size=512, negative="Negative (unused at cfg 1)"):
    ckpt = g.add("CheckpointLoaderSimple", [checkpoint], (x, 0))
    pos = g.add("CLIPTextEncode", [prompt], (x + 380, 0), title="Prompt", clip=(ckpt, 1))
    neg = g.add("CLIPTextEncode", [""], (x + 380, 220), title=negative, clip=(ckpt, 1))
    latent = g.add("EmptyLatentImage", [size, size, 1], (x + 380, 420))
    return ckpt, pos, neg, latent


def flux_base(g: Graph, prompt: str):
    """FLUX.1-schnell loaded as ComfyUI users do; the prompt goes to T5, CLIP-L gets an empty prompt (as the
    paper's FLUX pipeline); 1024x1024 as the paper's FLUX demo (64x64 image tokens)."""
    unet = g.add("UNETLoader", ["flux1-schnell.safetensors", "default"], (0, 0))
    clip = g.add("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"], (0, 160))
    vae = g.add("VAELoader", ["ae.safetensors"], (0, 360))
    pos = g.add("CLIPTextEncodeFlux", ["", prompt, 3.5], (380, 0), title="Prompt (T5)", clip=(clip, 0))
    neg = g.add("CLIPTextEncodeFlux", ["", "", 3.5], (380, 260), title="Negative (unused at cfg 1)", clip=(clip, 0))
    latent = g.add("EmptySD3LatentImage", [1024, 1024, 1], (380, 480))
    return unet, vae, pos, neg, latent


def painted_square(g: Graph, size: int, x=0, y=800):
    """A MASK: a square in the middle of the canvas. Replace these nodes by your own mask (e.g. the mask
    editor of Load Image)."""
    empty = g.add("SolidMask", [0.0, size, size], (x, y), title="Canvas")
    brush = g.add("SolidMask", [1.0, size // 2, size // 2], (x, y + 160), title="Painted square")
    return g.add("MaskComposite", [size // 4, size // 4, "add"], (x + 380, y + 80), destination=(empty, 0),
                 source=(brush, 0))


# KSampler settings: SDXL Turbo one step without classifier-free guidance (cfg 1), as in the paper; SDXL base
# 25 steps at guidance 8 and FLUX.1-schnell one step, as in the paper's later code.
TURBO = (1, 1.0, "euler_ancestral", "sgm_uniform")
BASE = (25, 8.0, "euler", "normal")
SCHNELL = (1, 1.0, "euler", "simple")


def sample(g: Graph, model, pos, neg, latent, vae, prefix, x, seed=42, seed_link=None, settings=TURBO):
    kw = {"seed": seed_link} if seed_link else {}
    steps, cfg, sampler, scheduler = settings
    ks = g.add("KSampler", [seed, "fixed", steps, cfg, sampler, scheduler, 1.0], (x, 0),
               model=model, positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0), **kw)
    dec = g.add("VAEDecode", [], (x, 320), samples=(ks, 0), vae=vae)
    if prefix:
        g.add("SaveImage", [prefix], (x, 440), images=(dec, 0))
    return dec


TOP_PITCH = 700  # Top Features grows to ~620 units once it shows its ranking


def explore() -> dict:
    g = Graph()
    ckpt, pos, neg, latent = base(g, "a photo of a colorful bird sitting on a branch, sunset")
    model, probe = (ckpt, 0), None
    y = 600
    for block, folder in PAPER_SAES.items():
        sae = g.add("UnboxLoadSAE", [folder], (0, y), title=f"SAE {block}")
        kw = {"probe": (probe, 1)} if probe else {}
        probe = g.add("UnboxProbeBlock", [AUTO, "all", "cond"], (380, y), title=f"Probe {block}",
                      model=model, sae=(sae, 0), **kw)
        model, y = (probe, 0), y + 200
    dec = sample(g, model, pos, neg, latent, (ckpt, 2), "sae_explore/image", 800)
    for i, block in enumerate(PAPER_SAES):
        top = g.add("UnboxTopFeatures", [9, block, -1, 0, 3, "inferno", 0.6, "sae_explore/top_features", "cond", 8.0],
                    (1200, i * TOP_PITCH), title=f"Top features {block}", probe=(probe, 1), image=(dec, 0))
        g.add("SaveImage", [f"sae_explore/top_{block}"], (1600, i * TOP_PITCH), images=(top, 0))
    heat = g.add("UnboxFeatureHeatmap", [0, "down.2.1", -1, "inferno", 0.6, "image max", "cond", 8.0],
                 (1200, 4 * TOP_PITCH),
                 title="Heatmap of one feature (set its index)", probe=(probe, 1), image=(dec, 0))
    g.add("SaveImage", ["sae_explore/heatmap"], (1600, 4 * TOP_PITCH), images=(heat, 0))
    return g.to_json("Explore: heatmaps and top features of the paper's four blocks",
                     "SDXL Turbo, 1 step. Probes record the SAE codes of down.2.1, mid.0, up.0.0 and up.0.1; "
                     "Top Features ranks each block's features over the image and saves the ranking as JSON.")


def steer_workflow(mode: str, features: str, strength: float, block: str, prompt: str, title: str, note: str,
                   painted: bool = False, prefix: str = "") -> dict:
    g = Graph()
    ckpt, pos, neg, latent = base(g, prompt)
    sae = g.add("UnboxLoadSAE", [PAPER_SAES[block]], (0, 600), title=f"SAE {block}")
    kw = {}
    if painted:
        kw["mask"] = (painted_square(g, 512), 0)
    steer = g.add("UnboxSteerFeatures", [features, strength, mode, AUTO, "mean activation", 0.0, 1.0, "cond"],
                  (380, 600), title=f"Steer ({mode})", model=(ckpt, 0), sae=(sae, 0), **kw)
    sample(g, (ckpt, 0), pos, neg, latent, (ckpt, 2), f"{prefix}/original", 800)
    sample(g, (steer, 0), pos, neg, latent, (ckpt, 2), f"{prefix}/steered", 1200)
    return g.to_json(title, note)


def feature_icon() -> dict:
    g = Graph()
    ckpt, pos, neg, latent = base(g, "")
    sae = g.add("UnboxLoadSAE", [PAPER_SAES["down.2.1"]], (0, 600), title="SAE down.2.1")
    # 'cond, uncond zeroed': the paper's icon also on SDXL base with CFG (at cfg 1 there are no uncond rows)
    steer = g.add("UnboxSteerFeatures", ["0", 10.0, "replace", AUTO, "mean activation", 0.0, 1.0,
                                         "cond, uncond zeroed"],
                  (380, 600), title="Feature turned on (replace, k x mean)", model=(ckpt, 0), sae=(sae, 0))
    sample(g, (steer, 0), pos, neg, latent, (ckpt, 2), "sae_feature_icon/feature", 800)
    return g.to_json("Feature icon", "The paper's visualisation of one feature: empty prompt, one step, the block's "
                     "update replaced by k x mean x the feature's direction (with CFG, as on SDXL base, the "
                     "negative rows' update set to zero, as the paper does). Change the feature index to browse.")


def reconstruct() -> dict:
    g = Graph()
    ckpt, pos, neg, latent = base(g, "a cozy cabin in a snowy forest at night, warm light in the windows")
    model = (ckpt, 0)
    for i, (block, folder) in enumerate(PAPER_SAES.items()):
        sae = g.add("UnboxLoadSAE", [folder], (0, 600 + i * 200), title=f"SAE {block}")
        rec = g.add("UnboxReconstructBlock", [AUTO, False, 0.0, 1.0, "cond"], (380, 600 + i * 200),
                    title=f"Reconstruct {block}", model=model, sae=(sae, 0))
        model = (rec, 0)
    sample(g, (ckpt, 0), pos, neg, latent, (ckpt, 2), "sae_reconstruct/original", 800)
    sample(g, model, pos, neg, latent, (ckpt, 2), "sae_reconstruct/reconstructed", 1200)
    return g.to_json("Reconstruct through the SAEs", "Each of the four blocks' updates is replaced by its SAE "
                     "reconstruction (error term dropped): what changes is what the SAEs do not capture.")


DUMP_FOLDER = "sae_dumps/sdxl_turbo"


def dump() -> dict:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [CHECKPOINT], (0, 0))
    prompts = g.add("UnboxPromptList", ["a photo of a cat sleeping on a sofa\na watercolor of a lighthouse at dawn\n"
                                        "an astronaut riding a horse on the moon", "", 0, "increment", 0],
                    (0, 200), title="Prompts (one per run)")
    pos = g.add("CLIPTextEncode", [""], (380, 0), title="Prompt", clip=(ckpt, 1), text=(prompts, 0))
    neg = g.add("CLIPTextEncode", [""], (380, 220), title="Negative (unused at cfg 1)", clip=(ckpt, 1))
    latent = g.add("EmptyLatentImage", [512, 512, 1], (380, 420))
    dumper = g.add("UnboxDumpActivations", [DUMP_FOLDER, "paper", "all", "cond", "update", "float16", 16384, ""],
                   (0, 560), title="Dump the paper's four blocks", model=(ckpt, 0))
    dec = sample(g, (dumper, 0), pos, neg, latent, (ckpt, 2), "", 800, seed=0, seed_link=(prompts, 1))
    g.add("UnboxDumpImages", ["when the queue is empty"], (1200, 0), images=(dec, 0), dump=(dumper, 1),
          prompt=(prompts, 0), seed=(prompts, 1))
    return g.to_json("Dump training data", "The paper's training data: SDXL Turbo, 1 step, cfg 1; the updates of "
                     "down.2.1, mid.0, up.0.0 and up.0.1 (256 vectors per image and block at 512x512) are written "
                     f"with the images to output/{DUMP_FOLDER}. Queue once per prompt (the index increments), or run "
                     "scripts/queue_prompts.py over a prompt file.")


def train() -> dict:
    g = Graph()
    ckpt, pos, neg, latent = base(g, "a watercolor of a lighthouse at dawn")
    sae = g.add("UnboxTrainSAE", [DUMP_FOLDER, "up.0.1", 5120, 10, "topk", 0, 4096, 1e-4, 0.05, 0, "my_sae_up.0.1",
                                  True], (0, 600), title="Train an SAE on the dump (up.0.1)")
    probe = g.add("UnboxProbeBlock", [AUTO, "all", "cond"], (380, 600), title="Probe with the new SAE",
                  model=(ckpt, 0), sae=(sae, 0))
    dec = sample(g, (probe, 0), pos, neg, latent, (ckpt, 2), "sae_train/original", 800)
    top = g.add("UnboxTopFeatures", [9, "up.0.1", -1, 0, 3, "inferno", 0.6, "sae_train/top_features", "cond", 8.0],
                (1200, 0), title="Top features of the new SAE", probe=(probe, 1), image=(dec, 0))
    g.add("SaveImage", ["sae_train/top_features"], (1600, 0), images=(top, 0))
    steer = g.add("UnboxSteerFeatures", ["0", 20.0, "add", AUTO, "absolute", 0.0, 1.0, "cond"],
                  (380, 900), title="Steer with the new SAE (put a top feature here)", model=(ckpt, 0), sae=(sae, 0))
    sample(g, (steer, 0), pos, neg, latent, (ckpt, 2), "sae_train/steered", 1200)
    return g.to_json("Train an SAE, explore and steer with it", "Trains a TopK SAE (5120 features, k=10) on the "
                     f"up.0.1 updates dumped to output/{DUMP_FOLDER} by the dump workflow and saves it to "
                     "models/sae/my_sae_up.0.1.safetensors with its feature statistics and features index; then "
                     "shows the top features of the new SAE on a generation, and adds one feature's direction "
                     "(put a feature from the grid in the steer node, and switch its units to 'mean activation').")


def flux_explore() -> dict:
    g = Graph()
    unet, vae, pos, neg, latent = flux_base(g, "a photo of a colorful bird sitting on a branch, sunset")
    sae = g.add("UnboxLoadSAE", [FLUX_SAE_FOLDER], (0, 600), title="The paper's FLUX SAE (double.18)")
    probe = g.add("UnboxProbeBlock", [AUTO, "all", "cond"], (380, 700), title="Probe double.18",
                  model=(unet, 0), sae=(sae, 0))
    dec = sample(g, (probe, 0), pos, neg, latent, (vae, 0), "sae_flux_explore/image", 800, settings=SCHNELL)
    top = g.add("UnboxTopFeatures", [9, "double.18", -1, 0, 3, "inferno", 0.6, "sae_flux_explore/top_features",
                                     "cond", 8.0, 1.0], (1200, 0), title="Top features of double.18",
                probe=(probe, 1), image=(dec, 0))
    g.add("SaveImage", ["sae_flux_explore/top_double.18"], (1600, 0), images=(top, 0))
    heat = g.add("UnboxFeatureHeatmap", [0, "double.18", -1, "inferno", 0.6, "image max", "cond", 8.0], (1200, TOP_PITCH),
                 title="Heatmap of one feature (set its index)", probe=(probe, 1), image=(dec, 0))
    g.add("SaveImage", ["sae_flux_explore/heatmap"], (1600, TOP_PITCH), images=(heat, 0))
    return g.to_json("FLUX: top features and heatmaps of the paper's FLUX SAE",
                     "FLUX.1-schnell, 1 step, 1024x1024 (64x64 image tokens). The probe records the codes of the "
                     "paper's FLUX SAE on double-stream block 18's image stream. To leave out always-on features, "
                     "compute the SAE's statistics over a dump (python -m sae_models stats) and lower "
                     "hide_above_frequency on Top Features.")


def flux_paint() -> dict:
    g = Graph()
    unet, vae, pos, neg, latent = flux_base(g, "a photo of a city street, people walking")
    sae = g.add("UnboxLoadSAE", [FLUX_SAE_FOLDER], (0, 600), title="The paper's FLUX SAE (double.18)")
    steer = g.add("UnboxSteerFeatures", ["0", 10.0, "add", AUTO, "mean activation", 0.0, 1.0, "cond"], (380, 700),
                  title="Paint (add, 10 x mean)", model=(unet, 0), sae=(sae, 0), mask=(painted_square(g, 1024), 0))
    sample(g, (unet, 0), pos, neg, latent, (vae, 0), "sae_flux_paint/original", 800, settings=SCHNELL)
    sample(g, (steer, 0), pos, neg, latent, (vae, 0), "sae_flux_paint/steered", 1200, settings=SCHNELL)
    return g.to_json("FLUX: paint a feature into a region",
                     "Adds 10 x mean x the feature's direction to double.18's image stream inside the painted mask "
                     "(the paper's FLUX demo paints with strength 10; it also adds the direction on every "
                     "single-stream block, this workflow on the SAE's own block only). Pick features with "
                     "flux_explore.")


def sdxl_base_paint() -> dict:
    g = Graph()
    ckpt, pos, neg, latent = base(g, "a photo of a city street, people walking", checkpoint=SDXL_BASE_NAME,
                                  size=1024, negative="Negative")
    sae = g.add("UnboxLoadSAE", [PAPER_SAES["down.2.1"]], (0, 600), title="SAE down.2.1 (trained on Turbo)")
    steer = g.add("UnboxSteerFeatures", ["0", 10.0, "add", AUTO, "mean activation", 0.0, 1.0, "cond +, uncond -"],
                  (380, 700), title="Paint: + on cond, - on uncond", model=(ckpt, 0), sae=(sae, 0),
                  mask=(painted_square(g, 1024), 0))
    sample(g, (ckpt, 0), pos, neg, latent, (ckpt, 2), "sae_base_paint/original", 800, settings=BASE)
    sample(g, (steer, 0), pos, neg, latent, (ckpt, 2), "sae_base_paint/steered", 1200, settings=BASE)
    return g.to_json("SDXL base: paint with classifier-free guidance",
                     "SDXL base 1.0, 25 steps, cfg 8, 1024x1024, as the paper's later code paints on it: the "
                     "feature is added to the cond rows and subtracted from the uncond rows inside the mask, so "
                     "guidance amplifies it. The paper's SAEs were trained on SDXL Turbo and transfer to base.")


def painted_disc(size: int) -> str:
    """A PNG data URL as the workbench panel paints one: black, with a white disc in the upper left."""
    import base64
    import io

    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).ellipse((size // 8, size // 8, size // 2, size // 2), fill=255)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workbench() -> dict:
    """The graph the workbench panel works on, clean: a probe of down.2.1 for the panel's ranking and heatmaps,
    and a concept search. The panel adds a steer node and its painted mask at the first Apply."""
    g = Graph()
    ckpt, pos, neg, latent = base(g, "a photo of a colorful bird sitting on a branch, sunset")
    sae = g.add("UnboxLoadSAE", [PAPER_SAES["down.2.1"]], (0, 600), title="SAE down.2.1")
    probe = g.add("UnboxProbeBlock", [AUTO, "all", "cond"], (380, 600), title="Probe down.2.1",
                  model=(ckpt, 0), sae=(sae, 0))
    dec = sample(g, (probe, 0), pos, neg, latent, (ckpt, 2), "sae_workbench/image", 800)
    top = g.add("UnboxTopFeatures", [9, "down.2.1", -1, 0, 3, "inferno", 0.6, "", "cond", 8.0], (1200, 0),
                title="Top features (the panel lists them)", probe=(probe, 1), image=(dec, 0))
    g.add("SaveImage", ["sae_workbench/top_down.2.1"], (1600, 0), images=(top, 0))
    find = g.add("UnboxFindFeatures", ["a red bird", "a bird", AUTO, 2, 1, 1.0, "euler_ancestral", "sgm_uniform",
                                       512, 512, 9],
                 (1200, TOP_PITCH), title="Find features of a concept", model=(ckpt, 0), clip=(ckpt, 1),
                 vae=(ckpt, 2), sae=(sae, 0))
    g.add("SaveImage", ["sae_workbench/concept"], (1600, TOP_PITCH), images=(find, 1))
    return g.to_json("Workbench: click, paint and find features in the SAE sidebar tab",
                     "Open the SAE tab of the sidebar and run: the panel shows the image and down.2.1's ranked "
                     "features; click one to see its heatmap, brush a region and Apply to paint it (the panel "
                     "adds a steer node and its painted mask to this graph), or label it. Find Features ranks "
                     "the features that fire more for 'a red bird' than for 'a bird'.")


WORKFLOWS = {
    "explore": explore,
    "paint": lambda: steer_workflow(
        "add", "0", 4.0, "down.2.1", "a photo of a city street, people walking",
        "Paint a feature into a region",
        "Adds 4 x mean x the feature's direction to down.2.1's update inside the painted mask (the paper's "
        "Paint). Pick features with the explore workflow; replace the square by your own mask.",
        painted=True, prefix="sae_paint"),
    "feature_icon": feature_icon,
    "ablate": lambda: steer_workflow(
        "ablate", "0, 1", 1.0, "up.0.1", "a red sports car on a mountain road, dramatic sky",
        "Ablate features", "Removes the features' own contributions from up.0.1's update wherever they fire "
        "(strength 1 = all of it), keeping the SAE's error so nothing else changes.", prefix="sae_ablate"),
    "reconstruct": reconstruct,
    "dump": dump,
    "train": train,
    "flux_explore": flux_explore,
    "flux_paint": flux_paint,
    "sdxl_base_paint": sdxl_base_paint,
    "workbench": workbench,
}


def main():
    OUT.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        example_path(name).write_text(json.dumps(make(), indent=1) + "\n")
        print("wrote", example_path(name))


if __name__ == "__main__":
    main()
