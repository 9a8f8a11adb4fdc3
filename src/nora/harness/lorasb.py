"""`nora train --method lorasb`: LoRA-SB (seed 004) as NoRA's "adapter" structure with LoRA-SB's initialisation.

Faithful to the official code (see ../shared/INIT.md): the first-update estimate dW_1 = -eta_1 sign(sum of the
gradients) over about 0.1 % of the training set, in train mode; B = U_r, R = Sigma_r / s, A = V_r^T of dW_1 with W
unchanged; s = 1. eta_1 defaults to the first warmup step's learning rate, lr / warmup_steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from ..config import NoraConfig
from . import HarnessError

#: the NoraConfig fields --method lorasb sets (a different explicit value on the command line is refused)
LORASB_FIELDS = {
    "structure": "adapter",
    "outer_init": "grad",
    "outer_scaling": "orthonormal",
    "inner_init": "grad_step",
    "grad_estimator": "sign",
    "alpha": None,  # s = alpha / r = 1
}
#: LoRA-SB estimates the first update on ~0.1 % of the training set; at least this many examples
LORASB_MIN_EXAMPLES = 2


def apply_lorasb(args: argparse.Namespace) -> None:
    """Set LoRA-SB's NoraConfig fields on the parsed `nora train` args (in place)."""
    defaults = {f.name: f.default for f in dataclasses.fields(NoraConfig)}
    for name, value in LORASB_FIELDS.items():
        given = getattr(args, name)
        if given != defaults[name] and given != value:
            flag = "--" + name.replace("_", "-")
            raise HarnessError(f"--method lorasb sets {flag} {value}; drop {flag} {given} (or use --method nora "
                               "to combine the inits freely).")  # fmt: skip
        setattr(args, name, value)
    if args.grad_first_step_lr is None:
        args.grad_first_step_lr = args.lr / max(args.warmup_steps, 1)  # LoRA-SB's eta_1: the first step's lr


def grad_init_samples(args: argparse.Namespace, n_train: int, world: int) -> int:
    """--grad-init-samples, else 64 (NoRA's gradient inits) or ~0.1 % of the training set (LoRA-SB)."""
    if args.grad_init_samples is not None:
        return args.grad_init_samples
    if args.method == "lorasb":
        return max(LORASB_MIN_EXAMPLES, world, math.ceil(0.001 * n_train))
    return 64
