"""ComfyUI entry point of the SAE Unbox node pack.

ComfyUI imports this file (under a module name made from the pack's folder) and calls `comfy_entrypoint`
once: it registers the `sae` model folder and the feature browser's routes, and hands ComfyUI the nodes
(the V3 way; there are no V1 mapping dicts, which ComfyUI would read instead). Heavy work (loading SAEs,
rendering) happens only when a node runs.
"""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("folder_paths") is not None:  # imported by ComfyUI, not e.g. by pytest collecting

    async def comfy_entrypoint():
        from .nodes import SAEUnboxExtension
        from .nodes.routes import register_routes
        from .nodes.sae_folder import register_sae_folder

        register_sae_folder()
        register_routes()  # the feature browser, the workbench and the labels, where ComfyUI's server runs
        return SAEUnboxExtension()

__all__ = ["WEB_DIRECTORY"]
