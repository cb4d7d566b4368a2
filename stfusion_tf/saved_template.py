"""A run's saved template (``template.keras``): load it, and rebuild a damaged one.

``load_template`` raises ``DamagedModelFile`` for a file that exists but does not
load (cut, overwritten); ``rebuild_from_checkpoint`` writes it again from the run's
newest complete checkpoint, keeping the damaged file beside it.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from stfusion_tf import callbacks as cb
from stfusion_tf import files
from stfusion_tf.errors import UserError
from stfusion_tf.training import MODEL_FILE


class DamagedModelFile(UserError):
    """A saved model file that exists but does not load (cut, overwritten)."""


def load_template(model_dir: str) -> keras.Model:
    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise UserError(f"no trained template at {path}; run --mode=train first")
    try:
        return keras.models.load_model(path)
    except Exception as e:  # noqa: BLE001 - a cut zip, bad JSON or HDF5 fail in many ways
        raise DamagedModelFile(f"{path} does not load ({type(e).__name__}: "
                               f"{str(e).strip()[:160]})") from None


def rebuild_from_checkpoint(model: keras.Model, model_dir: str, reason: str,
                            model_file: str = MODEL_FILE, log=print) -> keras.Model:
    """Rewrites a damaged ``model_file`` of a finished run from its newest complete
    checkpoint: ``model`` (built as in training) takes the checkpoint's weights and gate
    state, as ``train`` left them before saving.  The run's own recipe (``run.json``)
    says how many epochs make it finished."""
    from stfusion_tf import run_record
    record = run_record.read(model_dir)
    if record is None or "train" not in record.get("configs", {}):
        raise UserError(f"{reason}; re-run --mode=train to write it again")
    cfg = record["configs"]["train"]
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    got = cb.restore_newest(tf.train.Checkpoint(model=model, epoch=epoch), ckpt_dir, epoch, log)
    if got < cfg["epochs"]:
        raise UserError(f"{reason}, and the newest complete checkpoint in {ckpt_dir} is from "
                        f"epoch {got} of {cfg['epochs']}; re-run --mode=train to finish the run")
    cb.set_phase(model, variational=cfg["epochs"] > cfg["warmup_epochs"])
    path = os.path.join(model_dir, model_file)
    if os.path.exists(path):
        os.replace(path, path + ".damaged")
    files.save_keras(model, path)
    log(f"[checkpoint] {reason}; rebuilt it from the checkpoint of epoch {got} (the damaged "
        f"file is kept as {os.path.basename(path)}.damaged)")
    return model
