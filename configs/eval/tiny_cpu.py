"""A tiny probe that runs the evaluation code end to end on a CPU in seconds (tests, the sample job)."""

import ml_collections

from configs.eval import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.data.update(image_size=64, read_threads=2, read_buffer=4)
    c.backbone.update(dtype="float32")
    c.head.update(decoder_dim=32, ffn_dim=64, num_heads=4)
    c.train.update(lrs=(1e-3, 1e-2), batch_size=16, val_epochs=4, epochs=4, eval_period_epochs=2, log_every=5)
    c.eval.batch_size = 16
    c.metrics.n_bootstrap = 100
    c.report.update(overlays=1, overlay_classes=1)
    c.distributed.initialize = "never"
    return c
