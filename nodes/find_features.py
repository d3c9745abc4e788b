"""SAE Find Features: find the features of a concept with the model itself. The node samples a concept prompt
("a red car") and neutral prompts ("a car") over a few seeds, probes the SAE's block in each run, and ranks
the features by how much more they fire for the concept than for the neutral prompts."""

from __future__ import annotations

import json

import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.v0_0_2 import io, ui

from .errors import NodeInputError
from .models import resolve_block
from .patching import ProbeEdit, ProbeRecorder, attach_edit
from .render import labelled_grid, overlay
from .schema import AUTO, BLOCK_CHOICES, CATEGORY, SAE, checked_numbers

NODE = "SAE Find Features"
MAX_PROMPTS = 16
MAX_SEEDS = 16


def _prompts(concept: str, neutral: str) -> tuple[str, list[str]]:
    concept = (concept or "").strip()
    if not concept:
        raise NodeInputError(NODE, "concept is empty; write the concept's prompt, e.g. 'a red car'")
    lines = [ln.strip() for ln in (neutral or "").splitlines() if ln.strip()]
    if not lines:
        raise NodeInputError(NODE, "neutral is empty; write at least one prompt without the concept, e.g. 'a car'")
    if len(lines) > MAX_PROMPTS:
        raise NodeInputError(NODE, f"at most {MAX_PROMPTS} neutral prompts, got {len(lines)}")
    return concept, lines


class FindFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxFindFeatures",
            display_name=NODE,
            category=CATEGORY,
            description="Rank an SAE's features by how much more they fire for a concept prompt than for neutral "
            "prompts (e.g. 'a red car' against 'a car'), averaged over seeds: the model itself finds the "
            "concept's features, no other model is needed. Outputs the ranking as JSON, a labelled grid and "
            "one heatmap per top feature on the concept's first image.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                SAE.Input("sae"),
                io.String.Input("concept", default="a red car", tooltip="A prompt with the concept."),
                io.String.Input("neutral", multiline=True, default="a car",
                                tooltip="Prompts without it, one a line (compared with the concept's)."),
                io.Combo.Input("block", options=BLOCK_CHOICES, default=AUTO),
                io.Int.Input("seeds", default=2, min=1, max=MAX_SEEDS, tooltip="Seeds per prompt (0, 1, ...)."),
                io.Int.Input("steps", default=1, min=1, max=100),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("top_n", default=9, min=1, max=64),
            ],
            outputs=[io.String.Output(display_name="json"), io.Image.Output(display_name="grid"),
                     io.Image.Output(display_name="heatmaps")],
            is_output_node=True,
        )

    @classmethod
    @checked_numbers
    def execute(cls, model, clip, vae, sae, concept, neutral, block, seeds, steps, cfg, sampler_name, scheduler,
                width, height, top_n) -> io.NodeOutput:
        concept, neutrals = _prompts(concept, neutral)
        blk = resolve_block(NODE, sae, block, model)
        recorder = ProbeRecorder(handle=sae, block_name=blk.short)
        probed = attach_edit(model, ProbeEdit(block=blk, target="cond", node=NODE, handle=sae, record=recorder))
        channels = model.get_model_object("latent_format").latent_channels
        latent = torch.zeros(1, channels, height // 8, width // 8)
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        pbar = comfy.utils.ProgressBar((1 + len(neutrals)) * seeds)

        def mean_codes(prompt: str, keep_first: bool = False):
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
            total, first = torch.zeros(sae.sae.n_features), None
            for seed in range(seeds):
                noise = comfy.sample.prepare_noise(latent, seed)
                samples = comfy.sample.sample(probed, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent, denoise=1.0, disable_pbar=True, seed=seed)
                record = recorder.get(-1)
                cond = record.rows_of(0)
                total += record.mean_activation()[cond].mean(0)
                if keep_first and first is None:
                    first = (samples, record)
                pbar.update(1)
            return total / seeds, first

        concept_mean, (samples, record) = mean_codes(concept, keep_first=True)
        neutral_mean = torch.stack([mean_codes(p)[0] for p in neutrals]).mean(0)
        score = concept_mean - neutral_mean
        order = score.argsort(descending=True)[:top_n].tolist()
        labels = sae.labels()
        ranking = [{"feature": f, "score": float(score[f]), "concept_mean": float(concept_mean[f]),
                    "neutral_mean": float(neutral_mean[f]), **({"label": labels[f]} if f in labels else {})}
                   for f in order]

        image = vae.decode(samples)[:1, ..., :3].cpu().float()
        cond_row = record.rows_of(0)[0]
        tiles, titles = [], []
        for entry in ranking:
            fmap = record.feature_map(entry["feature"])[cond_row].unsqueeze(0)
            tile, _ = overlay(image, fmap, fmap.max(), "inferno", 0.6)
            tiles.append(tile[0])
            titles.append(f"#{entry['feature']}  +{entry['score']:.3g}" + (f"  {entry['label']}" if "label" in entry
                                                                               else ""))
        heatmaps = torch.stack(tiles)
        grid = labelled_grid(tiles, titles, columns=3)
        result = {"sae": sae.name, "block": blk.short, "concept": concept, "neutral": neutrals, "seeds": seeds,
                  "features": ranking}
        text = json.dumps(result, indent=2)
        return io.NodeOutput(text, grid, heatmaps, ui={**ui.PreviewImage(grid, cls=cls).as_dict(), "text": [text]})
