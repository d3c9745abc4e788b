"""ComfyUI entry point of the SAE Unbox node pack.

ComfyUI imports this file (under a module name made from the pack's folder). It registers the `sae`
model folder and the nodes; heavy work (loading SAEs, rendering) happens only when a node runs.
"""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("folder_paths") is None:
    # Imported outside ComfyUI (e.g. while pytest collects the repository): there is nothing to register.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.feature_browser import register_routes
    from .nodes.sae_folder import register_sae_folder

    register_sae_folder()
    register_routes()  # the feature browser page, where ComfyUI's server runs

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
