"""The patching engine: one keyed ComfyUI wrapper hooks the chosen transformer blocks for one call of the
diffusion model, and serves every probing, steering and dumping node.

- `wrapper`: the DIFFUSION_MODEL wrapper (`BlockPatch`), the per-run step clock's OUTER_SAMPLE wrapper, and
  `attach_edit`, through which every node adds its edit to a MODEL;
- `call`: what an edit knows about a call (`CallInfo`, `StepClock`), a block's input and output (`BlockView`),
  and the base class `Edit`;
- `block_io`: how each kind of block (SDXL spatial, FLUX double and single stream) is read as a grid;
- `edits`: steer and reconstruct; `recording`: probe and dump.
"""

from .call import CallInfo, Edit, NonFiniteEdit, StepClock
from .edits import ReconstructEdit, SAEEdit, SteerEdit, mask_weights
from .recording import (ROW_VIEWS, DumpEdit, ProbeEdit, ProbeRecorder, RecordingEdit, RunRecord, StepRecord,
                        run_id_of)
from .wrapper import KEY, BlockPatch, attach_edit, current_patch

__all__ = ["KEY", "ROW_VIEWS", "BlockPatch", "CallInfo", "DumpEdit", "Edit", "NonFiniteEdit", "ProbeEdit",
           "ProbeRecorder", "RecordingEdit", "ReconstructEdit", "RunRecord", "SAEEdit", "StepClock", "StepRecord",
           "SteerEdit", "attach_edit", "current_patch", "mask_weights", "run_id_of"]
