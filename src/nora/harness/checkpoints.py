"""Crash-safe checkpoints and final saves for `nora train`: a checkpoint is staged in OUT/.tmp-checkpoints/ and
renamed to OUT/checkpoint-N only once complete; the final adapter is written file by file with atomic renames."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from transformers import Trainer

from ..io import atomic_dir, replace_dir

#: where checkpoints are written before they are renamed to OUT/checkpoint-N (never read by --resume)
CHECKPOINT_STAGING = ".tmp-checkpoints"
#: the file transformers' Trainer writes last into a checkpoint: a checkpoint without it is incomplete
CHECKPOINT_LAST_FILE = "trainer_state.json"


# ------------------------------------------------------------------------------------------------ crash safety
class CrashSafeTrainer(Trainer):
    """A Trainer whose checkpoints appear atomically.

    Trainer writes checkpoint-N in place, file by file (a crash mid-save leaves a partial folder that a plain
    `get_last_checkpoint` would resume from). Here every rank writes the checkpoint into OUT/.tmp-checkpoints/
    checkpoint-N (model, optimizer, scheduler, its rng_state, trainer_state.json); after a barrier rank 0 renames the
    finished folder to OUT/checkpoint-N and only then rotates old checkpoints (--save-total-limit). A save that raises
    removes its staging folder; leftovers of a killed save are cleared by the next checkpoint and never resumed from.
    """

    _staging_dir: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = super()._get_output_dir(trial)
        staging = os.path.join(run_dir, CHECKPOINT_STAGING)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # no rank writes into staging before it is cleared
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if self.args.should_save:  # a failed save leaves nothing behind (after SIGKILL, the next save clears it)
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank has written its part (rng_state_<rank>.pth)
        if self.args.should_save:
            replace_dir(os.path.join(staging, name), os.path.join(run_dir, name))
            with contextlib.suppress(OSError):
                os.rmdir(staging)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)


def last_checkpoint(out: Path, verbose: bool = True) -> str | None:
    """The newest complete OUT/checkpoint-N (one holding trainer_state.json, which Trainer writes last), or None.

    CrashSafeTrainer only ever publishes complete checkpoints; an incomplete one (copied, or written in place by
    another tool) is skipped with a note rather than resumed from.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = sorted((int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := pattern.match(p.name)))
    for _, path in reversed(found):
        if (path / CHECKPOINT_LAST_FILE).is_file():
            return str(path)
        if verbose:
            print(f"nora train: skipping incomplete checkpoint {path} (no {CHECKPOINT_LAST_FILE}).", flush=True)
    return None


def save_final_model(trainer: Trainer, out: Path, pissa_init: Path | None = None) -> None:
    """The trained adapter (or full model) into `out`, crash-safely: rank 0 saves into a temporary sibling folder
    and each file is then renamed into `out` (nora.io.atomic_dir). Every rank calls Trainer.save_model (a model
    sharded at load time gathers its weights collectively there); the other ranks write nothing.

    PiSSA (`pissa_init`: the adapter saved before training) changes the base weights to W - B0 A0, so its raw adapter
    is only correct on that residual model; it is saved converted to a plain rank-2r LoRA of the ORIGINAL base model
    (PEFT's `path_initial_model_for_weight_conversion`), which `PeftModel.from_pretrained` and `nora eval` load."""
    if not trainer.args.should_save:
        trainer.save_model(str(out))
        return
    with atomic_dir(out) as tmp:
        trainer.save_model(str(tmp))
        if pissa_init is not None:
            trainer.model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=str(pissa_init))


def save_pissa_init(model, directory: Path) -> Path:
    """The freshly initialised PiSSA adapter (B0, A0), saved with init_lora_weights=True as PEFT's conversion needs."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        path = directory / "pissa_init"
        model.save_pretrained(str(path))
    finally:
        config.init_lora_weights = init
    return path
