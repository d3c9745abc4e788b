"""ComfyUI nodes of the pack: thin adapters over `sae_models` and the one patching mechanism (`patch.py`).

The node ids (`UnboxLoadSAE`, ...) are saved in workflows: never rename them. Each node spells its
display name once, in its schema.
"""

from comfy_api.v0_0_2 import ComfyExtension, io

from .dump import DumpActivations, DumpImages
from .find_features import FindFeatures
from .load import LoadSAE
from .painted_mask import PaintedMask
from .probe import FeatureHeatmap, ProbeBlock, TopFeatures
from .prompts import PromptList
from .steer import ReconstructBlock, SteerFeatures
from .train import TrainSAE

NODES: list[type[io.ComfyNode]] = [
    LoadSAE, SteerFeatures, ReconstructBlock, ProbeBlock, FeatureHeatmap, TopFeatures,
    DumpActivations, DumpImages, PromptList, TrainSAE, PaintedMask, FindFeatures,
]


class SAEUnboxExtension(ComfyExtension):
    """What ComfyUI's loader gets from the pack's `comfy_entrypoint`."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
