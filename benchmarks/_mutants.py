"""The scripted mutant set of benchmarks/bench_mutation.py: (file, old snippet, new snippet), one behaviour each.

Each mutant breaks one thing the README or a docstring promises. `old` must occur exactly once in the file (the
runner reports a mutant whose snippet no longer exists as "stale" instead of skipping it silently). `tests` overrides
the default core test subset for mutants whose behaviour only slower tests reach. `equivalent` explains a mutant that
cannot change observable behaviour (it is run anyway; a surviving equivalent mutant does not count against the score).
The first five are the ones issue 20 found passing the old suite.
"""

from __future__ import annotations

from typing import NamedTuple


class Mutant(NamedTuple):
    id: str
    file: str  # relative to src/nora
    old: str
    new: str
    what: str
    tests: tuple[str, ...] = ()
    equivalent: str = ""


RESUME_TESTS = (
    "tests/test_harness_cli.py::test_resume_equals_uninterrupted",
    "tests/test_crash_safety.py::test_checkpoint_failure_keeps_previous_checkpoints_and_resume_is_exact",
    "tests/test_crash_safety.py::test_resume_skips_a_half_written_checkpoint",
    "tests/test_crash_safety.py::test_sigkill_then_resume_equals_uninterrupted",
)

NAMED = [
    Mutant("issue-resume-from-step-0", "harness/train.py",
           "trainer.train(resume_from_checkpoint=resume_from)", "trainer.train(resume_from_checkpoint=None)",
           "--resume ignores the checkpoint and trains from step 0", tests=RESUME_TESTS),
    Mutant("issue-adapter-dropped", "layer.py",
           "result = result + self.adapter_delta(name, x).to(out_dtype)", "result = result",
           "the adapter term is dropped from forward"),
    Mutant("issue-adapter-in-half", "layer.py",
           "        dtype = inner_B.dtype\n",
           "        dtype = self.nora_B[adapter].dtype\n        inner_B = inner_B.to(dtype)\n"
           "        inner_A = inner_A.to(dtype) if inner_A is not None else None\n",
           "the adapter term is computed in the base dtype (bf16/fp16) instead of float32"),
    Mutant("issue-dropout-no-rescale", "layer.py",
           "h = self._cast_input_dtype(self.nora_dropout[adapter](x), right.dtype)",
           "h = self._cast_input_dtype(self.nora_dropout[adapter](x) * (1 - getattr(self.nora_dropout[adapter], "
           "'p', 0.0)), right.dtype)",
           "adapter dropout without the 1/(1-p) factor"),
    Mutant("issue-fold-x1.5", "layer.py", "return B @ inner_B, inner_A @ A", "return 1.5 * (B @ inner_B), inner_A @ A",
           "dW wrong by x1.5 in fold_factors (nested)"),
]  # fmt: skip

LAYER = [
    Mutant("layer-output-fold", "layer.py", "return inner_B, (inner_A @ B) @ A", "return inner_B, (inner_A @ B) @ A * 0.5",
           "structure='output' folds to half its dW"),
    Mutant("layer-parallel-fold", "layer.py", "return inner_B, inner_A @ A", "return -inner_B, inner_A @ A",
           "structure='parallel' folds to -dW"),
    Mutant("layer-adapter-fold", "layer.py", "return B @ inner_B, A", "return B @ inner_B.T, A",
           "structure='adapter' uses R^T"),
    Mutant("layer-no-scaling", "layer.py", "return (left * scaling if scaling != 1 else left), right",
           "return left, right", "scaling s = alpha / r_inner ignored"),
    Mutant("layer-scaling-squared", "layer.py", "return (left * scaling if scaling != 1 else left), right",
           "return (left * scaling * scaling if scaling != 1 else left), right", "scaling applied twice"),
    Mutant("layer-dropout-on-base", "layer.py",
           "        result = self.base_layer(x, *args, **kwargs)\n        if self.merged:",
           "        result = self.base_layer(self.nora_dropout[self.active_adapters[0]](x), *args, **kwargs)\n"
           "        if self.merged:",
           "the base path sees the adapter dropout"),
    Mutant("layer-conv1d-no-transpose", "layer.py", "if self.fan_in_fan_out:\n            delta = delta.T",
           "if False:\n            delta = delta.T", "get_delta_weight ignores Conv1D's (in, out) layout"),
    Mutant("layer-merge-sign", "layer.py", "merged = weight + self.get_delta_weight(name)",
           "merged = weight - self.get_delta_weight(name)", "merge subtracts dW"),
    Mutant("layer-unmerge-sign", "layer.py", "self.set_base_weight(self.get_base_weight() - self.get_delta_weight(name))",
           "self.set_base_weight(self.get_base_weight() + self.get_delta_weight(name))", "unmerge adds dW again"),
    Mutant("layer-merge-not-recorded", "layer.py", "            self.merged_adapters.append(name)",
           "            pass", "merge does not record the merged adapter (forward adds dW twice)"),
    Mutant("layer-no-safe-merge", "layer.py", "if safe_merge and not torch.isfinite(merged).all():", "if False:",
           "safe_merge never checks finiteness"),
    Mutant("layer-disable-ignored", "layer.py", "if self.disable_adapters:\n            if self.merged:",
           "if False:\n            if self.merged:", "disable_adapter() still applies the adapter"),
    Mutant("layer-merged-adds-again", "layer.py", "if self.merged:\n            return result",
           "if False:\n            return result", "a merged adapter is added again in forward"),
    Mutant("layer-first-adapter-only", "layer.py", "for name in self.active_adapters:\n            if name not in",
           "for name in self.active_adapters[:1]:\n            if name not in", "only the first active adapter counts"),
    Mutant("layer-nested-shapes", "layer.py", '"nested": ((r, r_inner), (r_inner, r)),', '"nested": ((r, r), (r, r)),',
           "nested inner factors r x r (r_inner ignored)"),
    Mutant("layer-init-weights-ignored", "layer.py", 'method = config.inner_init if config.init_weights else "gaussian"',
           "method = config.inner_init", "init_weights=False still gives the identity init"),
    Mutant("layer-one-seed", "layer.py", "seed = config.init_seed + _stable_hash(module_name)",
           "seed = config.init_seed", "every module gets the same SVD/random seed"),
    Mutant("layer-awsvd-scale-ignored", "layer.py",
           "scale = activation_scale(act_mean_abs, config.awsvd_alpha, config.awsvd_eps)",
           "scale = torch.ones_like(act_mean_abs)", "AwSVD statistics ignored (plain SVD)"),
    Mutant("layer-pending-not-cleared", "layer.py", "                del self._outer_pending[name]\n",
           "                pass\n", "loaded outer factors still count as missing"),
]  # fmt: skip

INIT = [
    Mutant("init-svd-no-sigma", "init.py", "return OuterFactors(U if orthonormal else U * S, Vh, S)",
           "return OuterFactors(U, Vh, S)", "svd: B = U_r without Sigma_r"),
    Mutant("init-awsvd-no-inverse", "init.py", "return OuterFactors(U if orthonormal else U * S, Vh / s, S)",
           "return OuterFactors(U if orthonormal else U * S, Vh, S)", "awsvd: A = V_r^T without S^-1"),
    Mutant("init-awsvd-unscaled", "init.py", "U, S, Vh = truncated_svd(weight.to(dtype) * s, r, **svd_kwargs)",
           "U, S, Vh = truncated_svd(weight.to(dtype), r, **svd_kwargs)", "awsvd: SVD of W instead of W S"),
    Mutant("init-scale-no-alpha", "init.py", "return stats.clamp_min(eps * peak).pow(alpha)",
           "return stats.clamp_min(eps * peak)", "activation_scale ignores awsvd_alpha"),
    Mutant("init-scale-no-floor", "init.py", "return stats.clamp_min(eps * peak).pow(alpha)",
           "return stats.pow(alpha)", "activation_scale: no floor for dead channels"),
    Mutant("init-smallest-triplets", "init.py", "        return U[:, :r], S[:r], Vh[:r]\n    q = min",
           "        return U[:, -r:], S[-r:], Vh[-r:]\n    q = min", "full SVD keeps the smallest r triplets"),
    Mutant("init-no-oversample", "init.py", "q = min(r + oversample, *w.shape)", "q = min(r, *w.shape)",
           "randomized SVD without oversampling"),
    Mutant("init-fixed-seed", "init.py", "        torch.manual_seed(seed)\n        U, S, V = torch.svd_lowrank",
           "        torch.manual_seed(0)\n        U, S, V = torch.svd_lowrank", "randomized SVD ignores its seed"),
    Mutant("init-zeros-not-zero", "init.py", "        inner_B.zero_()\n        if inner_A is not None:",
           "        inner_B.normal_(0.0, std)\n        if inner_A is not None:", "inner_init='zeros' draws B'"),
    Mutant("init-zeros-std", "init.py", "            inner_A.normal_(0.0, std)", "            inner_A.normal_(0.0, 2 * std)",
           "inner_init='zeros': A' with twice the std"),
    Mutant("init-uniform-bound", "init.py", "bound = math.sqrt(3.0) * std", "bound = std",
           "uniform init with the wrong variance"),
    Mutant("init-sqrt-sigma-no-root", "init.py", "root = sigma.detach().float().clamp_min(0).sqrt().cpu()",
           "root = sigma.detach().float().clamp_min(0).cpu()", "sqrt_sigma puts sigma, not sqrt(sigma), on the diagonal"),
    Mutant("init-rank-bound", "init.py", "if r > min(m, n):", "if r > max(m, n):", "r > min(m, n) accepted"),
    Mutant("init-no-finite-check", "init.py",
           'if weight.device.type != "meta" and not torch.isfinite(weight).all():', "if False:",
           "NaN/inf base weights accepted"),
    Mutant("init-random-unscaled", "init.py", "B = torch.randn(m, r, generator=gen) * (rms_sigma / math.sqrt(m))",
           "B = torch.randn(m, r, generator=gen)", "outer_init='random' without the SVD's scale"),
    Mutant("init-auto-never-full", "init.py", 'if max(shape) <= AUTO_FULL_MAX_DIM:\n            return "full"',
           'if max(shape) <= 0:\n            return "full"', "svd_method='auto' never picks the exact SVD"),
    Mutant("init-recon-unweighted", "init.py", "diff, w = diff * s, w * s", "diff, w = diff, w",
           "reconstruction_error ignores the activation weights"),
    Mutant("init-orthonormal-ignored", "init.py", 'orthonormal = outer_scaling == "orthonormal"', "orthonormal = False",
           "outer_scaling='orthonormal' ignored"),
]  # fmt: skip

EXPORT = [
    Mutant("export-alpha", "export.py", "lora_alpha=rank,", "lora_alpha=2 * rank,", "exported lora_alpha != r"),
    Mutant("export-lora-a-scaled", "export.py", 'state[f"{name}.lora_A.weight"] = lora_A.to(dtype).contiguous()',
           'state[f"{name}.lora_A.weight"] = (1.5 * lora_A).to(dtype).contiguous()', "exported lora_A x1.5"),
    Mutant("export-float32", "export.py", "dtype = layer._base_dtype()", "dtype = torch.float32",
           "exported factors not in the base dtype"),
    Mutant("export-fan-in-fan-out", "export.py", "fan_in_fan_out |= layer.fan_in_fan_out", "fan_in_fan_out |= False",
           "Conv1D export without fan_in_fan_out"),
    Mutant("export-no-modules-to-save", "export.py",
           'if not key.rsplit(".", 1)[-1].startswith(NoraModel.prefix):\n            state[key]',
           'if False:\n            state[key]', "modules_to_save (and biases) dropped from the export"),
    Mutant("export-merged-unloaded", "export.py", "merged = model.merge_and_unload()", "merged = model.unload()",
           "export_merged saves the base without the adapter"),
    Mutant("export-bias-none", "export.py", "bias=_LORA_BIAS[config.bias],", 'bias="none",',
           "trained biases exported as bias='none'"),
]  # fmt: skip

CALIBRATION = [
    Mutant("calib-no-abs", "calibration.py", "x = x.detach().float().abs()", "x = x.detach().float()",
           "mean x instead of mean |x|"),
    Mutant("calib-mask-ignored", "calibration.py", "if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):",
           "if False:", "padding counted in the statistics"),
    Mutant("calib-count-pads", "calibration.py", "total, count = flat[keep].sum(0), int(keep.sum())",
           "total, count = flat[keep].sum(0), int(keep.numel())", "token count includes padding"),
    Mutant("calib-sum-not-mean", "calibration.py", "stats[name] = (total / count).float().cpu()",
           "stats[name] = total.float().cpu()", "statistics are sums, not means"),
    Mutant("calib-no-all-reduce", "calibration.py",
           "            torch.distributed.all_reduce(total)\n            torch.distributed.all_reduce(count)\n",
           "            pass\n", "no all-reduce under torch.distributed",
           tests=("tests/test_calibration.py::test_distributed_calibration_agrees_across_ranks",)),
    Mutant("calib-max-batches-ignored", "calibration.py", "if max_batches is not None and seen >= max_batches:",
           "if False:", "max_batches ignored"),
    Mutant("calib-no-shape-check", "calibration.py",
           "if in_features is not None and tuple(value.shape) != (in_features,):", "if False:",
           "set_calibration accepts wrong shapes"),
    Mutant("calib-conv1d-in-features", "calibration.py",
           "in_features = module.weight.shape[0] if _is_conv1d(module) else",
           "in_features = module.weight.shape[1] if _is_conv1d(module) else", "Conv1D input size read as output size"),
    Mutant("calib-not-eval", "calibration.py", "    model.eval()\n    device", "    pass\n    device",
           "calibration runs with dropout active"),
    Mutant("calib-train-mode-not-restored", "calibration.py", "model.train(was_training)", "model.train(True)",
           "calibrate leaves an eval model in train mode"),
    Mutant("calib-last-batch-only", "calibration.py",
           "sums[name] = total if sums[name] is None else sums[name] + total", "sums[name] = total",
           "only the last batch's sums are kept"),
]  # fmt: skip

MODEL = [
    Mutant("model-gpt2-targets", "model.py", '"gpt2": ["c_attn", "c_proj", "c_fc"],', '"gpt2": ["c_attn", "c_proj"],',
           "GPT-2 default targets miss c_fc"),
    Mutant("model-inactive-trainable", "model.py", "            new_module.requires_grad_(False)\n",
           "            pass\n", "an added (inactive) adapter is trainable",
           equivalent="PEFT 0.21's BaseTuner.inject_adapter ends with set_adapter(active_adapters), which sets "
           "requires_grad on every layer after _create_and_replace, so the line (kept from LoRA's _create_and_replace) "
           "has no observable effect; test_params::test_an_added_adapter_stays_frozen_until_it_is_set_active checks "
           "the behaviour on a wrapped and on a newly wrapped module"),
    Mutant("model-fingerprint-last-only", "model.py",
           "config.base_fingerprint = {**(config.base_fingerprint or {}), key: actual}",
           "config.base_fingerprint = {key: actual}", "the fingerprint keeps only the last module"),
    Mutant("model-fingerprint-unchecked", "model.py",
           "if not config.check_base_fingerprint or (full_file",
           "if True or not config.check_base_fingerprint or (full_file", "the base fingerprint is never checked"),
    Mutant("model-no-shape-check", "model.py", "        if wrong:\n            raise ValueError(",
           "        if False:\n            raise ValueError(", "wrong tensor shapes load without the clear error"),
    Mutant("model-no-outer-check", "model.py", "        if missing:\n            raise ValueError(",
           "        if False:\n            raise ValueError(", "a file without outer factors loads"),
    Mutant("model-outer-float32", "model.py", "                    buffers[adapter_name] = buffers[adapter_name].to(dtype)",
           "                    pass", "frozen outer buffers stay float32 on a half-precision base"),
    Mutant("model-fan-in-fan-out", "model.py", "nora_config.fan_in_fan_out = isinstance(base, Conv1D)",
           "nora_config.fan_in_fan_out = False", "Conv1D not recorded as fan_in_fan_out"),
    Mutant("model-calibration-ignored", "model.py", "act = getattr(base, CALIBRATION_ATTR, None)", "act = None",
           "calibration statistics never reach the layer"),
    Mutant("model-count-all", "model.py", "return sum(p.numel() for p in model.parameters() if p.requires_grad)",
           "return sum(p.numel() for p in model.parameters())", "count_trainable counts frozen parameters"),
]  # fmt: skip

CONFIG = [
    Mutant("config-scaling-by-r", "config.py", "        return alpha / width\n", "        return alpha / self.r\n",
           "s = alpha / r instead of alpha / r_inner"),
    Mutant("config-alpha-default", "config.py", "alpha = width if self.alpha is None else self.alpha",
           "alpha = self.r if self.alpha is None else self.alpha", "alpha=None means alpha = r (s != 1)"),
    Mutant("config-no-rank-order-check", "config.py", 'if self.structure != "adapter" and self.r_inner > self.r:',
           "if False:", "r_inner > r accepted"),
    Mutant("config-dropout-one", "config.py", "if not 0.0 <= self.nora_dropout < 1.0:",
           "if not 0.0 <= self.nora_dropout <= 1.0:", "nora_dropout=1 accepted"),
    Mutant("config-bool-rank", "config.py",
           "if isinstance(value, bool) or not isinstance(value, int) or value <= 0:",
           "if not isinstance(value, int) or value <= 0:", "r=True accepted"),
    Mutant("config-no-format-check", "config.py",
           "if isinstance(self.format_version, int) and self.format_version > FORMAT_VERSION:", "if False:",
           "adapters of a newer format accepted"),
    Mutant("config-std-ignored", "config.py",
           "return DEFAULT_INNER_INIT_STD[inner_init] if self.inner_init_std is None else self.inner_init_std",
           "return DEFAULT_INNER_INIT_STD[inner_init]", "an explicit inner_init_std is ignored"),
    Mutant("config-eps-zero", "config.py", "if not 0 < self.awsvd_eps < 1:", "if not 0 <= self.awsvd_eps < 1:",
           "awsvd_eps=0 accepted"),
    Mutant("config-layers-pattern", "config.py", "if self.layers_pattern and self.layers_to_transform is None:",
           "if False:", "layers_pattern without layers_to_transform accepted"),
]  # fmt: skip

MUTANTS = NAMED + LAYER + INIT + EXPORT + CALIBRATION + MODEL + CONFIG
SCOPE = ("layer.py", "init.py", "export.py", "calibration.py", "model.py", "config.py")
