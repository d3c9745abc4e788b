"""Training the paper's TopK SAE (and BatchTopK, Matryoshka BatchTopK) on activation vectors.

    sae = train(batches, n_features=5120, k=10)        # options: the fields of `TrainConfig`

Modules: `recipe` (the paper's recipe, documented there: init, loss, AuxK, decoder constraints),
`config` (`TrainConfig`), `trainer` (`Trainer`, `train`: the loop, logging, checkpoints), `rebatcher`
(fixed-size batches with a resumable state), `sparse_ops` and `pair_ops` (the sparse autograd functions of
the step's CPU and GPU paths), `distributed` (data-parallel helpers).
"""

from .config import TrainConfig
from .recipe import geometric_median, project_decoder_grad_, unit_norm_decoder_
from .trainer import CHECKPOINT_NAME, Trainer, train

__all__ = ["CHECKPOINT_NAME", "TrainConfig", "Trainer", "geometric_median", "project_decoder_grad_", "train",
           "unit_norm_decoder_"]
