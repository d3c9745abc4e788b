"""ComfyUI nodes of the pack: thin adapters over `sae_models` and the one patching mechanism (`patch.py`)."""

from .dump import DumpActivations, DumpImages, PromptList
from .load import LoadSAE
from .probe import FeatureHeatmap, ProbeBlock, TopFeatures
from .steer import ReconstructBlock, SteerFeatures
from .train import TrainSAE

# Stable node ids (saved in workflows): never rename them.
NODE_CLASS_MAPPINGS = {
    "UnboxLoadSAE": LoadSAE,
    "UnboxSteerFeatures": SteerFeatures,
    "UnboxReconstructBlock": ReconstructBlock,
    "UnboxProbeBlock": ProbeBlock,
    "UnboxFeatureHeatmap": FeatureHeatmap,
    "UnboxTopFeatures": TopFeatures,
    "UnboxDumpActivations": DumpActivations,
    "UnboxDumpImages": DumpImages,
    "UnboxPromptList": PromptList,
    "UnboxTrainSAE": TrainSAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UnboxLoadSAE": "Load SAE",
    "UnboxSteerFeatures": "SAE Steer Features",
    "UnboxReconstructBlock": "SAE Reconstruct Block",
    "UnboxProbeBlock": "SAE Probe Block",
    "UnboxFeatureHeatmap": "SAE Feature Heatmap",
    "UnboxTopFeatures": "SAE Top Features",
    "UnboxDumpActivations": "SAE Dump Activations",
    "UnboxDumpImages": "SAE Dump Images",
    "UnboxPromptList": "SAE Prompt List",
    "UnboxTrainSAE": "SAE Train",
}
