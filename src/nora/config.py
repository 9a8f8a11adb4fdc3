"""`NoraConfig`: every knob of NoRA, validated when the config is built."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from . import patterns


class NoraPeftType(str):
    """NoRA's peft_type: the string "NORA" that also reads like a member of PEFT's `PeftType` enum.

    PEFT's mappings accept plain string keys, but transformers' `load_adapter`, `peft.utils.hotswap` and parts of
    PEFT's save path read `config.peft_type.value` (and `.name`). `PeftType` cannot gain members without patching
    PEFT, so nora uses a `str` subclass: equal to and hashed like "NORA" (dict keys, JSON), with `.value`/`.name`.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"<PeftType.{self.name}: {self.value!r}>"

    def __reduce__(self):
        return (NoraPeftType, (str.__str__(self),))


PEFT_TYPE = NoraPeftType("NORA")
#: 2 (issue 21): compact files (save_outer_factors=False); version-1 files are full files and keep loading
FORMAT_VERSION = 2
#: the inner rank r' when NoraConfig(r_inner=None)
DEFAULT_R_INNER = 32

STRUCTURES = ("nested", "output", "parallel", "adapter")
BIASES = ("none", "all", "nora_only")
ACTIVATION_MEMORY = ("auto", "low", "folded")
OUTER_INITS = ("svd", "awsvd", "random", "grad")
INNER_INITS = ("zeros", "gaussian", "uniform", "sqrt_sigma", "grad", "grad_step")
#: inits computed by `nora.gradient_init` after get_peft_model (the layer holds zero placeholders until then)
GRAD_INNER_INITS = ("grad", "grad_step")
OUTER_SCALINGS = ("sigma", "orthonormal")
GRAD_ESTIMATORS = ("projected", "sign")
SVD_METHODS = ("auto", "full", "randomized", "randomized_bf16")
#: svd_method="auto" runs the exact SVD on matrices with max(m, n) <= this, a randomized SVD on larger ones
AUTO_FULL_MAX_DIM = 2048
#: inner_init_std=None resolves per init: the random A' of "zeros" sets how fast B' moves away from 0; for
#: "gaussian"/"uniform" both factors are random and their product is the adapter's update at init
DEFAULT_INNER_INIT_STD = {"zeros": 0.1, "gaussian": 0.02, "uniform": 0.02, "sqrt_sigma": 0.02, "grad": 0.1,
                          "grad_step": 0.02}  # fmt: skip


def _check_choice(field_name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(
            f"NoraConfig: unknown {field_name}={value!r}; valid values are {', '.join(map(repr, valid))}."
        )


@dataclass
class NoraConfig(PeftConfig):
    """Configuration of a NoRA adapter (Nested Low-Rank Adaptation).

    For a frozen weight W (m x n) NoRA adds a frozen rank-r "outer" factorisation B (m x r), A (r x n) taken from a
    truncated (activation-aware) SVD of W, and trains only a small "inner" LoRA B' (r x r'), A' (r' x r) nested between
    them:

        h = W x + s * B B' A' A x,      s = alpha / r_inner

    so each adapted matrix trains 2 * r * r_inner numbers, and the update dW = (s B B')(A' A) is exactly a rank-r_inner
    LoRA that `nora.export_lora` writes as a plain PEFT LoRA adapter.

    `structure` selects the variant of the NoRA v2 design space (seed 001, Tables 6-7):

    - ``"nested"`` (default, the paper's w_a): dW = s B B' A' A, trainable 2 r r'.
    - ``"output"`` (the paper's w_b): the inner LoRA sits serially on the output side,
      dW = s B' A' B A with B' (m x r'), A' (r' x m); trainable 2 m r'.
    - ``"parallel"``: h = W x + s (B + C A') A x with the frozen B A reproducing W, i.e. dW = s C A' A with
      C (m x r'), A' (r' x r); trainable m r' + r' r.
    - ``"adapter"``: a trainable r x r matrix R between B and A, dW = s B R A; this is LoRA-XS. trainable r^2.
    """

    r: int = field(default=64, metadata={"help": "Outer rank r of the frozen factors B (m x r) and A (r x n)."})
    r_inner: int | None = field(
        default=None,
        metadata={
            "help": "Inner rank r' of the trainable factors; None means 32. structure='adapter' has no inner rank "
            "(its trainable core R is r x r): leave it None there (it is then recorded as r)."
        },
    )
    rank_pattern: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "Per-module outer rank r, as PEFT LoRA's rank_pattern: {'k_proj': 192}, on the CLI "
            "--rank-pattern k_proj=192 (a key is a regex matched against the end of a module name; unmatched modules "
            "use r). None means {}."
        },
    )
    r_inner_pattern: dict[str, int] | None = field(
        default=None,
        metadata={"help": "Per-module inner rank r', keyed like rank_pattern; unmatched modules use r_inner."},
    )
    alpha: float | None = field(
        default=None,
        metadata={
            "help": "Scaling numerator: s = alpha / r_inner (r for structure='adapter'). None means alpha = r_inner, i.e. s = 1."
        },
    )
    structure: Literal["nested", "output", "parallel", "adapter"] = field(
        default="nested", metadata={"help": f"Where the trainable inner factors sit; one of {STRUCTURES}."}
    )
    outer_init: Literal["svd", "awsvd", "random", "grad"] = field(
        default="svd",
        metadata={
            "help": "Frozen outer factors: 'svd' (B = U_r Sigma_r, A = V_r^T), 'awsvd' (activation-aware, needs "
            "nora.calibrate first), 'random' (ablation) or 'grad' (LoRA-SB's basis: B = U_r, A = V_r^T of the "
            "first-update estimate -grad_first_step_lr * sign(sum of gradients); filled by nora.gradient_init after "
            "get_peft_model, which materialises each targeted layer's m x n gradient once)."
        },
    )
    outer_scaling: Literal["sigma", "orthonormal"] = field(
        default="sigma",
        metadata={
            "help": "Where Sigma goes: 'sigma' (B = U_r Sigma_r) or 'orthonormal' (B = U_r, A = V_r^T; for awsvd "
            "A = V_r^T S^-1, the orthonormal factors of the scaled problem W S). With Adam, Sigma in B acts as a "
            "per-direction step-size multiplier; orthonormal factors change the effective lr scale, so re-tune lr."
        },
    )
    awsvd_alpha: float = field(
        default=0.5, metadata={"help": "AwSVD exponent: S_j = (mean over tokens of |x_j|) ** awsvd_alpha."}
    )
    awsvd_eps: float = field(
        default=1e-4,
        metadata={
            "help": "Floor for the AwSVD channel statistics, relative to the largest channel: channels with "
            "mean |x_j| < awsvd_eps * max_k mean |x_k| are raised to that floor so S stays invertible."
        },
    )
    svd_method: Literal["auto", "full", "randomized", "randomized_bf16"] = field(
        default="auto",
        metadata={
            "help": "'full' (exact, torch.linalg.svd), 'randomized' (torch.svd_lowrank, seeded by init_seed), "
            "'randomized_bf16' (the same subspace iteration with bfloat16 products and a float32 Rayleigh-Ritz "
            f"step) or 'auto': full for matrices with max(out, in) <= {AUTO_FULL_MAX_DIM}; above it "
            "randomized_bf16 where the device multiplies bf16 natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), "
            "randomized elsewhere (benchmarks/RESULTS.md section 3b: LLaMA-3-8B init in 100 s on 2 CPU cores, within "
            "0.04% of the exact residual)."
        },
    )
    svd_niter: int = field(default=4, metadata={"help": "Power iterations of the randomized SVD."})
    svd_oversample: int = field(
        default=64, metadata={"help": "Extra random directions of the randomized SVD (q = r + svd_oversample)."}
    )
    init_seed: int = field(
        default=0,
        metadata={"help": "Seed for the randomized SVD and the random outer init (per module, so every rank agrees)."},
    )
    inner_init: Literal["zeros", "gaussian", "uniform", "sqrt_sigma", "grad", "grad_step"] = field(
        default="zeros",
        metadata={
            "help": "Inner init: 'zeros' (B' = 0, A' gaussian: exact identity at init), 'gaussian' (both "
            "N(0, inner_init_std^2)), 'uniform' (both uniform with the same variance), 'sqrt_sigma' (seed 000: "
            "square roots of the top singular values on the diagonals; with outer_scaling='orthonormal' that is seed "
            "000's parametrisation and starts at dW = W_r' (top r' singular values doubled); with B = U Sigma it "
            "starts at dW = U Sigma^2 V^T, far from the base model), 'grad' (B' = 0, A' spans the top-r' right "
            "singular directions of the projected task gradient: exact identity) or 'grad_step' (B' A' = the "
            "truncated first-update estimate, LoRA-One style: NOT an identity, the model starts one truncated "
            "warmup step ahead, as LoRA-SB does). 'grad'/'grad_step' need nora.gradient_init after get_peft_model."
        },
    )
    inner_init_std: float | None = field(
        default=None,
        metadata={
            "help": "Std of the random inner factors. None: 0.1 for A' of inner_init='zeros' (with Adam the first "
            "updates of B' scale with |A'|; 0.1 beat 0.02 on every seed of the encoder sentiment task in "
            "benchmarks/RESULTS.md section 4, and lost at the same lr on the decoder and multiple choice), "
            "0.02 for 'gaussian'/'uniform' (both factors random, so their product perturbs W at init)."
        },
    )
    grad_estimator: Literal["projected", "sign"] = field(
        default="projected",
        metadata={
            "help": "First-update estimate of nora.gradient_init: 'projected' (only the r x r projected gradient "
            "B^T G A^T per layer, never an m x n gradient; scaled to the norm of one sign step on the r x r core) "
            "or 'sign' (LoRA-SB's -grad_first_step_lr * sign(sum of gradients); materialises each layer's m x n "
            "gradient). outer_init='grad' needs 'sign'."
        },
    )
    grad_first_step_lr: float | None = field(
        default=None,
        metadata={
            "help": "eta_1 of the first-update estimate: the lr of the first optimizer step (LoRA-SB: lr / "
            "warmup_steps). Needed by inner_init='grad_step'; 'grad' and outer_init='grad' use directions only."
        },
    )
    grad_scale: float = field(
        default=1.0, metadata={"help": "Multiplier on grad_first_step_lr (LoRA-SB and LoRA-One use 1)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the documented init given by outer_init/inner_init. False: both inner factors random "
            "(gaussian, inner_init_std or 0.02), so the adapter is not an identity at init; meant for tests."
        },
    )
    nora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    activation_memory: Literal["auto", "low", "folded"] = field(
        default="auto",
        metadata={
            "help": "What autograd saves per token for the adapter term while training. 'low': only z = A x (r "
            "numbers; nora.lowmem, plus dropout's boolean mask when nora_dropout > 0), never x (n numbers). "
            "'folded': the folded rank-r_inner product F.linear(F.linear(x, A'A), left), which saves x like LoRA. "
            "'auto' (default): 'low' for every structure except 'adapter', whose folded path already saves only A x. "
            "Without autograd (no_grad, inference) every mode runs the folded product. Trade-off measured in "
            "benchmarks/RESULTS.md (activation memory)."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names, a regex, or 'all-linear'. None uses nora's default for the model family "
            "(see nora.model.DEFAULT_TARGET_MODULES)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to exclude from target_modules."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True for layers storing weight as (in, out), e.g. GPT-2 Conv1D; set automatically."},
    )
    bias: Literal["none", "all", "nora_only"] = field(
        default="none",
        metadata={
            "help": "Which biases train, as in PEFT's LoRA: 'none', 'all' (every bias of the model) or 'nora_only' "
            "(the biases of the NoRA-wrapped layers). Trained biases are saved with the adapter, merged (they are "
            "the base layer's own) and exported by export_lora. Only one adapter of a model may have bias != 'none'. "
            "With a trained bias, disable_adapter() does not restore the base model's outputs (PEFT warns)."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved, e.g. a classification head."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h') used with layers_to_transform."}
    )
    base_fingerprint: dict | None = field(
        default=None,
        metadata={"help": "Filled on save: shapes and checksums of the adapted base weights, checked on load."},
    )
    base_quantization: dict | None = field(
        default=None,
        metadata={
            "help": "Filled by get_peft_model on a quantized base (nora.quantized): the base's quantization config "
            "(transformers' quantization_config, or the backend and layer settings), so the adapter records the base "
            "it was trained on."
        },
    )
    check_base_fingerprint: bool = field(
        default=True,
        metadata={
            "help": "On load, compare the base with base_fingerprint (nora.fingerprint.apply_fingerprint_policy): "
            "a full file (outer factors stored) onto a different base warns once and loads; a compact file "
            "(save_outer_factors=False) refuses it; other shapes always refuse. False skips the check (no warning; "
            "a compact file then rebuilds its outer factors from whatever base it is given)."
        },
    )
    save_outer_factors: bool = field(
        default=True,
        metadata={
            "help": "True: save_pretrained writes the frozen outer factors B, A (a full adapter file). False: a "
            "compact file with the inner factors, AwSVD channel scales and a per-module verification record; the "
            "outer factors are rebuilt from the base model on load and verified (see README 'Compact adapters')."
        },
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Adapter format version of nora."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        _check_choice("structure", self.structure, STRUCTURES)
        _check_choice("outer_init", self.outer_init, OUTER_INITS)
        _check_choice("inner_init", self.inner_init, INNER_INITS)
        _check_choice("svd_method", self.svd_method, SVD_METHODS)
        _check_choice("outer_scaling", self.outer_scaling, OUTER_SCALINGS)
        _check_choice("grad_estimator", self.grad_estimator, GRAD_ESTIMATORS)
        self._check_gradient_init()
        _check_choice("activation_memory", self.activation_memory, ACTIVATION_MEMORY)
        for name in ("r", "r_inner"):
            if name == "r_inner":  # after r is known to be valid: the 'adapter' default is r itself
                self._resolve_r_inner()
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NoraConfig: {name} must be a positive integer, got {value!r}.")
        if self.structure != "adapter" and self.r_inner > self.r:
            raise ValueError(
                f"NoraConfig: r_inner={self.r_inner} exceeds the outer rank r={self.r}; the nested update has rank "
                f"<= min(r, r_inner), so choose r_inner <= r (e.g. r={self.r}, r_inner={self.r // 2 or 1})."
            )
        patterns.check(self)
        if not 0.0 <= self.nora_dropout < 1.0:
            raise ValueError(f"NoraConfig: nora_dropout must be in [0, 1), got {self.nora_dropout}.")
        if self.awsvd_alpha < 0:
            raise ValueError(f"NoraConfig: awsvd_alpha must be >= 0, got {self.awsvd_alpha}.")
        if not 0 < self.awsvd_eps < 1:
            raise ValueError(f"NoraConfig: awsvd_eps must be in (0, 1), got {self.awsvd_eps}.")
        if self.inner_init_std is not None and self.inner_init_std <= 0:
            raise ValueError(f"NoraConfig: inner_init_std must be > 0, got {self.inner_init_std}.")
        if self.svd_niter < 0 or self.svd_oversample < 0:
            raise ValueError("NoraConfig: svd_niter and svd_oversample must be >= 0.")
        if not self.save_outer_factors and self.svd_method == "randomized_bf16":
            raise ValueError(
                "NoraConfig: save_outer_factors=False rebuilds the outer factors on load, which needs a reproducible "
                "SVD, but svd_method='randomized_bf16' multiplies in bfloat16. Use svd_method='randomized', 'full' or "
                "'auto' (compact adapters run it in float64), or keep save_outer_factors=True."
            )
        if not self.save_outer_factors and self.outer_init == "grad":
            raise ValueError(
                "NoraConfig: save_outer_factors=False rebuilds the outer factors from the base weight on load, but "
                "outer_init='grad' factors come from the task's gradient. Keep save_outer_factors=True."
            )
        _check_choice("bias", self.bias, BIASES)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("NoraConfig: layers_pattern is only used together with layers_to_transform.")
        if isinstance(self.format_version, int) and self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"NoraConfig: this adapter uses nora format version {self.format_version}, but the installed nora "
                f"reads versions <= {FORMAT_VERSION}. Upgrade nora-peft (pip install -U nora-peft)."
            )
        self._from_checkpoint = False

    def _resolve_r_inner(self) -> None:
        """r_inner None -> DEFAULT_R_INNER, or r for 'adapter'; an r_inner 'adapter' cannot use is refused (the one
        exception, 32 != r, is what configs saved before r_inner defaulted to None recorded: a warning, not an error)."""
        if self.r_inner is None:
            self.r_inner = self.r if self.structure == "adapter" else DEFAULT_R_INNER
        elif self.structure == "adapter" and self.r_inner != self.r:
            if self.r_inner != DEFAULT_R_INNER:
                raise ValueError(
                    f"NoraConfig: r_inner={self.r_inner} has no effect with structure='adapter' (LoRA-XS: the trainable "
                    f"core R is r x r = {self.r} x {self.r}). Drop r_inner, or choose the core size with r."
                )
            warnings.warn(
                f"NoraConfig: r_inner=32 has no effect with structure='adapter' (the core R is r x r = {self.r} x "
                f"{self.r}); it is recorded as r_inner={self.r}. Configs saved by nora before r_inner defaulted to "
                "None carry this value; elsewhere drop r_inner.",
                UserWarning,
                stacklevel=3,
            )
            self.r_inner = self.r

    @property
    def needs_gradient_init(self) -> bool:
        """True when nora.gradient_init must fill the factors after get_peft_model."""
        return self.outer_init == "grad" or (self.init_weights and self.inner_init in GRAD_INNER_INITS)

    def _check_gradient_init(self) -> None:
        grad_inner = self.inner_init in GRAD_INNER_INITS
        if (grad_inner or self.outer_init == "grad") and self.structure not in ("nested", "adapter"):
            raise ValueError(
                f"NoraConfig: inner_init={self.inner_init!r} / outer_init={self.outer_init!r} support structure "
                f"'nested' and 'adapter', not {self.structure!r}; use inner_init='zeros' and outer_init='svd'."
            )
        if self.structure == "adapter" and self.inner_init == "grad":
            raise ValueError(
                "NoraConfig: inner_init='grad' sets B' = 0 and aligns A'; structure='adapter' has a single r x r core "
                "R, so 'grad' would just be R = 0. Use inner_init='zeros' or 'grad_step' (LoRA-SB's R = Sigma / s)."
            )
        if self.outer_init == "grad" and self.grad_estimator != "sign":
            raise ValueError(
                "NoraConfig: outer_init='grad' needs the full first-update estimate; set grad_estimator='sign' "
                "('projected' only sees B^T G A^T, which needs outer factors to exist already)."
            )
        if self.outer_init == "grad" and self.outer_scaling != "orthonormal":
            raise ValueError(
                "NoraConfig: outer_init='grad' gives orthonormal factors B = U_r, A = V_r^T of the first-update "
                "estimate (LoRA-SB); set outer_scaling='orthonormal'."
            )
        if self.outer_init == "grad" and self.inner_init not in ("zeros", *GRAD_INNER_INITS):
            raise ValueError(
                f"NoraConfig: outer_init='grad' combines with inner_init 'zeros', 'grad' or 'grad_step', not "
                f"{self.inner_init!r}."
            )
        if self.inner_init == "grad_step" and (self.grad_first_step_lr is None or self.grad_first_step_lr <= 0):
            raise ValueError(
                "NoraConfig: inner_init='grad_step' starts at the truncated first update, scaled by the first step's "
                "lr; set grad_first_step_lr > 0 (LoRA-SB: lr / warmup_steps)."
            )
        if self.grad_scale <= 0:
            raise ValueError(f"NoraConfig: grad_scale must be > 0, got {self.grad_scale}.")

    @property
    def scaling(self) -> float:
        """s = alpha / k where k is the width of the trainable bottleneck (r_inner, or r for 'adapter')."""
        width = self.r if self.structure == "adapter" else self.r_inner
        alpha = width if self.alpha is None else self.alpha
        return alpha / width

    def inner_std_for(self, inner_init: str) -> float:
        """The std `inner_init` draws its random inner factors with: `inner_init_std`, or its per-init default."""
        return DEFAULT_INNER_INIT_STD[inner_init] if self.inner_init_std is None else self.inner_init_std

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load a saved config. Outer factors are then read from the checkpoint, so no SVD/calibration runs."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        config_file = os.path.join(path, "adapter_config.json")
        if os.path.isdir(path) and not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"{path} has no adapter_config.json; pass the directory written by model.save_pretrained()."
            )
        if os.path.isfile(config_file):
            try:
                with open(config_file) as fh:
                    json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{config_file} is not valid JSON ({exc}); the adapter directory is corrupt."
                ) from exc
            _check_adapter_weights(path)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._from_checkpoint = True
        return config

    def to_dict(self):
        out = super().to_dict()
        out.pop("_from_checkpoint", None)
        return out


def _check_adapter_weights(path: str) -> None:
    """A local adapter directory must hold a readable weights file; PEFT would otherwise fail later with a
    confusing hub error (missing file) or a bare SafetensorError (truncated/corrupt file)."""
    safetensors_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(safetensors_file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            return
        raise FileNotFoundError(
            f"{path} has adapter_config.json but no adapter_model.safetensors; the adapter directory is incomplete. "
            "Pass the directory written by model.save_pretrained()."
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(safetensors_file, framework="pt") as fh:
            fh.keys()
    except SafetensorError as exc:
        raise ValueError(
            f"{safetensors_file} is corrupt or truncated ({exc}); re-save the adapter with model.save_pretrained()."
        ) from exc
