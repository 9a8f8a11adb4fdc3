"""NoRA on real model families: one parametrized matrix plus the PEFT workflows around it.

Families (tiny random configs, see tests/_models.py): Llama causal LM, GPT-2 (Conv1D), BERT sequence classifier
(modules_to_save=["classifier"]), ViT image classifier, CLIP (text + vision towers) and a diffusers
UNet2DConditionModel (targets nora.DIFFUSERS_UNET_TARGET_MODULES).

Matrix chosen (128 cases, r=8, r_inner=4):
  - Llama: the full product structure {nested, output, parallel, adapter} x inner_init {zeros, gaussian, uniform,
    sqrt_sigma} x outer_init {svd, awsvd, random}  (48 cases);
  - GPT-2, BERT, ViT, CLIP, UNet: every structure x inner_init {zeros, gaussian} x outer_init {svd, awsvd}
    (16 cases each).
For awsvd the base model is first calibrated with nora.calibrate on 2 random batches.

Each case asserts:
  - inner_init="zeros": the wrapped model's output is bit-identical to the base model's (torch.equal);
  - one optimizer step (SGD for nested/parallel, AdamW for output/adapter, lr 1e-2) changes inner parameters only:
    base weights and the frozen outer buffers nora_B / nora_A stay bit-identical;
  - on a non-identity adapter (the documented init if it is not "zeros", else init_weights=False):
    disable_adapter() gives the base output exactly; save_pretrained -> PeftModel.from_pretrained on a fresh copy of
    the (uncalibrated) base gives bit-identical outputs; merged == unmerged outputs (fp32, atol 1e-5); merging twice
    is a no-op; the merged weights are W + dW with dW from tests/_oracle.py (the paper's product of the raw factors,
    atol 1e-5); unmerge restores the base weights (atol 1e-6).

The export to a plain PEFT LoRA is checked in ONE subprocess that never imports nora (asserted via sys.modules) for a
representative subset: every family once and every structure once on Llama, plus awsvd / random outer inits
(logits within atol 1e-5).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import _models as M
import _oracle as O
import nora
from conftest import config_kwargs
from nora.model import nora_layers

R, R_INNER = 8, 4
STRUCTURES = ("nested", "output", "parallel", "adapter")
INNER_INITS = ("zeros", "gaussian", "uniform", "sqrt_sigma")
OUTER_INITS = ("svd", "awsvd", "random")
OTHER_FAMILIES = ("gpt2", "bert", "vit", "clip", "unet")

CASES = [("llama", s, i, o) for s in STRUCTURES for i in INNER_INITS for o in OUTER_INITS] + [
    (f, s, i, o) for f in OTHER_FAMILIES for s in STRUCTURES for i in ("zeros", "gaussian") for o in ("svd", "awsvd")
]

FAMILY_KWARGS = {
    "llama": {},
    "gpt2": {},
    "bert": {"modules_to_save": ["classifier"]},
    "vit": {},
    "clip": {},
    "unet": {"target_modules": nora.DIFFUSERS_UNET_TARGET_MODULES},
}


def make_config(family: str, **kwargs) -> nora.NoraConfig:
    return nora.NoraConfig(**config_kwargs(**{"r": R, "r_inner": R_INNER, **FAMILY_KWARGS[family], **kwargs}))


def calibration_batches(family: str) -> list[dict[str, torch.Tensor]]:
    return [M.inputs(family, seed=11), M.inputs(family, seed=12)]


def forward(family: str, model, batch) -> torch.Tensor:
    with torch.no_grad():
        return M.output(family, model, batch)


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in nora_layers(model)}


def is_adapter_key(key: str) -> bool:
    """Tensors a NoRA training step may change: the inner factors and modules_to_save copies."""
    return "nora_inner_" in key or ".modules_to_save." in key


def one_step_changes_only_inner(family: str, model, batch, optimizer_cls) -> None:
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    assert all(is_adapter_key(n) for n in trainable), [n for n in trainable if not is_adapter_key(n)]
    state = model.state_dict()
    assert any(".nora_B." in k for k in state) and any(".nora_A." in k for k in state), "outer buffers not persistent"
    before = {k: v.detach().clone() for k, v in state.items()}
    optimizer = optimizer_cls(list(trainable.values()), lr=1e-2)
    M.output(family, model, batch).float().pow(2).mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("nora_inner_" in k for k in changed), "the optimizer step changed no inner factor"
    frozen_changed = sorted(k for k in changed if not is_adapter_key(k))
    assert not frozen_changed, f"frozen tensors changed: {frozen_changed[:5]}"


@pytest.mark.parametrize(("family", "structure", "inner_init", "outer_init"), CASES)
def test_matrix(family, structure, inner_init, outer_init, tmp_path):
    batch = M.inputs(family)
    base = M.fresh(family)
    ref = forward(family, base, batch)
    pristine = copy.deepcopy(base)  # an uncalibrated copy of the base weights, for loading
    kwargs = {"structure": structure, "inner_init": inner_init, "outer_init": outer_init}
    if outer_init == "awsvd":
        nora.calibrate(base, make_config(family, **kwargs), calibration_batches(family), progress=False)

    # (1) the documented init: exact identity for zeros; one optimizer step only moves the inner factors
    model = get_peft_model(copy.deepcopy(base), make_config(family, **kwargs))
    out = forward(family, model, batch)
    if inner_init == "zeros":
        assert torch.equal(out, ref), "inner_init='zeros' is not an exact identity at init"
    optimizer_cls = torch.optim.SGD if structure in ("nested", "parallel") else torch.optim.AdamW
    one_step_changes_only_inner(family, model, batch, optimizer_cls)

    # (2) a non-identity adapter
    model = get_peft_model(base, make_config(family, **kwargs, init_weights=inner_init != "zeros"))
    out = forward(family, model, batch)
    assert not torch.equal(out, ref), "the adapter should change the output"
    assert torch.isfinite(out).all()
    with model.disable_adapter():
        assert torch.equal(forward(family, model, batch), ref), "disable_adapter() is not the base model"

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert torch.equal(forward(family, loaded, batch), out), "save -> load changed the outputs"

    weights = base_weights(model)
    model.merge_adapter()
    merged = forward(family, model, batch)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=0, msg="merged != unmerged")
    once = base_weights(model)
    config = model.peft_config["default"]
    for name, layer in nora_layers(model):  # merged W == W + the oracle's dW (independent of nora's fold)
        expected = weights[name].double() + O.delta_weight_in_layout(layer, config)
        torch.testing.assert_close(once[name].double(), expected, atol=1e-5, rtol=0, msg=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()  # already merged: a no-op
    twice = base_weights(model)
    assert all(torch.equal(once[k], twice[k]) for k in once), "merging twice changed the weights"
    torch.testing.assert_close(forward(family, model, batch), merged, atol=0, rtol=0)
    model.unmerge_adapter()
    restored = base_weights(model)
    for key in weights:
        torch.testing.assert_close(restored[key], weights[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(forward(family, model, batch), out, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# export_lora -> plain PEFT in a process that never imports nora

EXPORT_CASES = [
    ("llama", "nested", "gaussian", "svd"),
    ("llama", "output", "zeros", "svd"),
    ("llama", "parallel", "uniform", "svd"),
    ("llama", "adapter", "sqrt_sigma", "svd"),
    ("llama", "nested", "zeros", "awsvd"),
    ("llama", "nested", "gaussian", "random"),
    ("gpt2", "nested", "gaussian", "svd"),
    ("gpt2", "output", "zeros", "awsvd"),
    ("bert", "parallel", "zeros", "svd"),
    ("vit", "output", "gaussian", "awsvd"),
    ("clip", "adapter", "zeros", "svd"),
    ("unet", "nested", "gaussian", "awsvd"),
]

PLAIN_PEFT_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import _models as M
from peft import PeftModel
from peft.tuners.lora import LoraLayer

results = {}
for case_dir in sys.argv[2:]:
    with open(case_dir + "/meta.json") as fh:
        family = json.load(fh)["family"]
    data = torch.load(case_dir + "/case.pt")
    base = M.build(family)
    with torch.no_grad():
        base_out = M.output(family, base, data["inputs"])
    model = PeftModel.from_pretrained(base, case_dir + "/lora")
    with torch.no_grad():
        out = M.output(family, model, data["inputs"])
    results[case_dir] = {
        "base_diff": float((base_out - data["base"]).abs().max()),
        "diff": float((out - data["expected"]).abs().max()),
        "lora_layers": sum(isinstance(m, LoraLayer) for m in model.modules()),
        "peft_type": str(model.peft_config["default"].peft_type),
    }
results["nora_imported"] = sorted(m for m in sys.modules if m == "nora" or m.startswith("nora."))
print(json.dumps(results))
"""


def test_export_lora_loads_in_plain_peft_subprocess(tmp_path):
    dirs, n_layers = [], {}
    for family, structure, inner_init, outer_init in EXPORT_CASES:
        case_dir = tmp_path / f"{family}-{structure}-{inner_init}-{outer_init}"
        batch = M.inputs(family)
        base = M.fresh(family)
        ref = forward(family, base, batch)
        cfg = make_config(family, structure=structure, inner_init=inner_init, outer_init=outer_init)
        if outer_init == "awsvd":
            nora.calibrate(base, cfg, calibration_batches(family), progress=False)
        model = get_peft_model(base, cfg)
        # one AdamW step: non-identity inner factors and (BERT) a trained classifier copy
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        M.output(family, model, batch).float().pow(2).mean().backward()
        optimizer.step()
        expected = forward(family, model, batch)
        assert not torch.equal(expected, ref)
        nora.export_lora(model, case_dir / "lora")
        (case_dir / "meta.json").write_text(json.dumps({"family": family}))
        torch.save({"inputs": batch, "expected": expected, "base": ref}, case_dir / "case.pt")
        dirs.append(str(case_dir))
        n_layers[str(case_dir)] = len(list(nora_layers(model)))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_SCRIPT, tests_dir, *dirs],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("nora_imported") == [], "the plain-PEFT process imported nora"
    for case_dir, res in results.items():
        assert res["base_diff"] <= 1e-6, (case_dir, res)  # the subprocess rebuilt the same base model
        assert res["peft_type"].endswith("LORA"), (case_dir, res)
        assert res["lora_layers"] == n_layers[case_dir], (case_dir, res)
        assert res["diff"] <= 1e-5, (case_dir, res)


# ---------------------------------------------------------------------------------------------------------------------
# PEFT workflows


def test_multiple_adapters_add_set_delete(tmp_path):
    batch = M.inputs("llama")
    base = M.fresh("llama")
    ref = forward("llama", base, batch)
    pristine = copy.deepcopy(base)
    nora.calibrate(base, make_config("llama"), calibration_batches("llama"), progress=False)
    model = get_peft_model(base, make_config("llama", init_weights=False))
    out_a = forward("llama", model, batch)
    model.add_adapter("b", make_config("llama", structure="adapter", outer_init="awsvd", init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert set(layer.nora_inner_B) == {"default", "b"} and layer.nora_inner_B["b"].shape == (R, R)
    assert forward("llama", model, batch).equal(out_a), "add_adapter must not activate the new adapter"
    assert not layer.nora_inner_B["b"].requires_grad

    model.set_adapter("b")
    out_b = forward("llama", model, batch)
    assert not torch.equal(out_b, out_a) and not torch.equal(out_b, ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    assert forward("llama", loaded, batch).equal(out_a)
    loaded.set_adapter("b")
    assert forward("llama", loaded, batch).equal(out_b)

    model.set_adapter("default")
    model.delete_adapter("b")
    assert "b" not in model.peft_config and "b" not in layer.nora_inner_B and "b" not in layer.nora_B
    assert not any(".b" in k and "nora" in k for k in model.state_dict())
    assert forward("llama", model, batch).equal(out_a)


def test_merge_and_unload_returns_plain_model():
    for family in ("llama", "gpt2", "unet"):
        batch = M.inputs(family)
        base = M.fresh(family)
        base_cls = type(base)
        model = get_peft_model(base, make_config(family, init_weights=False))
        out = forward(family, model, batch)
        plain = model.merge_and_unload()
        assert type(plain) is base_cls
        assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
        assert not any("nora" in k for k in plain.state_dict())
        torch.testing.assert_close(forward(family, plain, batch), out, atol=1e-5, rtol=0)


def test_print_trainable_parameters(capsys):
    model = get_peft_model(M.fresh("llama"), make_config("llama"))
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    n_matrices = 7  # q k v o gate up down, one layer
    expected = n_matrices * 2 * R * R_INNER
    assert f"trainable params: {expected:,}" in printed
    trainable, _total = model.get_nb_trainable_parameters()
    assert trainable == expected


def test_trainer_runs_two_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(M.fresh("llama"), make_config("llama"))
    outer_before = {k: v.clone() for k, v in model.state_dict().items() if ".nora_A." in k or ".nora_B." in k}
    inner_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, M.VOCAB, (4, M.SEQ), generator=gen)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in inner_before.items())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in outer_before.items())


def test_trl_sft_trainer_with_nora_peft_config(tiny_tokenizer, tmp_path):
    """TRL's SFTTrainer(peft_config=NoraConfig(...)) wraps, trains (inner factors only) and saves a reloadable adapter."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from conftest import build_tiny_llama
    from nora import NoraConfig
    from nora.layer import NoraLayer

    conversation = [{"role": "user", "content": "is the sky blue?"}, {"role": "assistant", "content": "true"}]
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=64,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=build_tiny_llama(tiny_tokenizer),
        args=args,
        train_dataset=Dataset.from_list([{"messages": conversation}] * 4),
        processing_class=tiny_tokenizer,
        peft_config=NoraConfig(r=R, r_inner=R_INNER, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "NORA"
    assert sum(isinstance(m, NoraLayer) for m in model.modules()) == 2 * 7  # 2 layers x q k v o gate up down
    outer_before = {k: v.clone() for k, v in model.state_dict().items() if ".nora_A." in k or ".nora_B." in k}
    inner_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert inner_before and all(".nora_inner_" in n for n in inner_before)

    assert trainer.train().global_step == 2
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in inner_before.items())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in outer_before.items())

    trainer.save_model(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "NORA"
    ids = tiny_tokenizer("is the sky blue?", return_tensors="pt").input_ids
    model.eval()
    reloaded = PeftModel.from_pretrained(build_tiny_llama(tiny_tokenizer), tmp_path / "adapter").eval()
    # SFTConfig defaults to bf16=True: accelerate wraps the trained model's forward in a CPU bf16 autocast, so the
    # reloaded adapter is compared under the same autocast (whose logits that wrapper casts back to fp32)
    assert args.bf16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(reloaded(ids).logits.float(), model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(family, dtype, tmp_path):
    batch = M.inputs(family)
    base = M.build(family, dtype=dtype)
    pristine = copy.deepcopy(base)
    ref = forward(family, base, batch)
    model = get_peft_model(base, make_config(family))
    assert torch.equal(forward(family, model, batch), ref), "zeros init must be an identity in half precision too"
    layers = list(nora_layers(model))
    assert layers
    for _, layer in layers:
        assert layer.get_base_layer().weight.dtype == dtype
        assert layer.nora_B["default"].dtype == dtype and layer.nora_A["default"].dtype == dtype
        assert layer.nora_inner_B["default"].dtype == torch.float32
        assert layer.nora_inner_A["default"].dtype == torch.float32
    one_step_changes_only_inner(family, model, batch, torch.optim.AdamW)
    out = forward(family, model, batch)
    assert out.dtype == dtype and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(pristine, tmp_path)
    for _, layer in nora_layers(loaded):
        assert layer.nora_B["default"].dtype == dtype and layer.nora_inner_B["default"].dtype == torch.float32
    assert torch.equal(forward(family, loaded, batch), out)


def test_inference_mode_makes_nothing_trainable(tmp_path):
    model = get_peft_model(M.fresh("llama"), make_config("llama", inference_mode=True))
    assert not any(p.requires_grad for p in model.parameters())
    assert list(nora_layers(model))

    trained = get_peft_model(M.fresh("llama"), make_config("llama"))
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(M.fresh("llama"), tmp_path)  # is_trainable=False by default
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded = PeftModel.from_pretrained(M.fresh("llama"), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("nora_inner_" in n for n in trainable)


def test_layers_to_transform_and_exclude_modules():
    base = M.build("llama", num_hidden_layers=2)
    model = get_peft_model(base, make_config("llama", layers_to_transform=[1], layers_pattern="layers"))
    names = [name for name, _ in nora_layers(model)]
    assert names and all(".layers.1." in n for n in names), names
    assert len(names) == 7

    base = M.build("llama", num_hidden_layers=2)
    model = get_peft_model(base, make_config("llama", exclude_modules=["down_proj", "o_proj"]))
    names = [name for name, _ in nora_layers(model)]
    assert len(names) == 2 * 5
    assert not any(n.endswith(("down_proj", "o_proj")) for n in names)


def test_default_target_modules_per_family():
    """target_modules=None resolves nora's defaults (also for the diffusers UNet, by class name)."""
    expected = {
        "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        "gpt2": {"c_attn", "c_proj", "c_fc"},
        "vit": {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"},
        "unet": {"to_q", "to_k", "to_v", "0"},
    }
    for family, suffixes in expected.items():
        model = get_peft_model(M.fresh(family), nora.NoraConfig(r=R, r_inner=R_INNER))
        found = {name.rsplit(".", 1)[-1] for name, _ in nora_layers(model)}
        assert found == suffixes, (family, found)
