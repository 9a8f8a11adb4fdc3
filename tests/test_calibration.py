"""AwSVD calibration: streaming batches, padding masks, statistics -> outer factors, the reconstruction report, and
torch.distributed (2 gloo processes calibrating on different batches must agree bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import _models as M
import nora
from nora.init import activation_scale, outer_awsvd, outer_svd
from nora.model import CALIBRATION_ATTR, nora_layers


def lin_config(**kwargs) -> nora.NoraConfig:
    return nora.NoraConfig(**{"r": 4, "r_inner": 2, "target_modules": ["lin"], **kwargs})


class MaskedLinear(nn.Module):
    """Takes a dict batch {x, attention_mask} like a transformers model; the mask itself is not used in forward."""

    def __init__(self, n: int = 6, m: int = 5):
        super().__init__()
        self.lin = nn.Linear(n, m)

    def forward(self, x, attention_mask=None):
        return self.lin(x)


def test_batches_as_tensor_tuple_dict_and_generator():
    torch.manual_seed(0)
    xs = [torch.randn(3, 4, 6), torch.randn(2, 4, 6)]
    expected = torch.cat([x.reshape(-1, 6) for x in xs]).abs().mean(0)
    model = MaskedLinear()
    for batches in (
        list(xs),
        [(x,) for x in xs],
        [{"x": x} for x in xs],
        (x for x in xs),  # a one-shot generator: calibrate streams, it never needs len()
    ):
        stats = nora.calibrate(model, lin_config(), batches, progress=False)
        assert set(stats) == {"lin"}
        torch.testing.assert_close(stats["lin"], expected, atol=1e-6, rtol=0)
    # forward_fn overrides how a batch is fed; max_batches stops early
    stats = nora.calibrate(
        model, lin_config(), [{"inp": x} for x in xs], forward_fn=lambda mdl, b: mdl(b["inp"]), progress=False
    )
    torch.testing.assert_close(stats["lin"], expected, atol=1e-6, rtol=0)
    stats = nora.calibrate(model, lin_config(), xs, max_batches=1, progress=False)
    torch.testing.assert_close(stats["lin"], xs[0].reshape(-1, 6).abs().mean(0), atol=1e-6, rtol=0)


def test_attention_mask_excludes_padding():
    """Padded positions carry huge (even infinite) activations; with the mask they leave the statistics unchanged."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    valid = x[mask.bool()]
    huge = x.clone()
    huge[~mask.bool()] = 1e6
    inf = x.clone()
    inf[~mask.bool()] = float("inf")
    model = MaskedLinear()
    stats = {
        name: nora.calibrate(model, lin_config(), [{"x": t, "attention_mask": mask}], progress=False)["lin"]
        for name, t in (("clean", x), ("huge", huge), ("inf", inf))
    }
    torch.testing.assert_close(stats["clean"], valid.abs().mean(0), atol=1e-6, rtol=0)
    assert torch.equal(stats["huge"], stats["clean"]) and torch.equal(stats["inf"], stats["clean"])
    unmasked = nora.calibrate(model, lin_config(), [{"x": huge}], progress=False)["lin"]
    assert unmasked.min() > 1e5  # without the mask the padding dominates


def test_attention_mask_on_a_real_model():
    """Right-padded Llama batch: the pad token id does not matter when attention_mask marks the pads."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, M.VOCAB, (2, M.SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[1, 7:] = 0
    cfg = nora.NoraConfig(r=4, r_inner=2)
    stats = []
    for pad in (3, 60):
        padded = ids.masked_fill(mask == 0, pad)
        stats.append(
            nora.calibrate(M.fresh("llama"), cfg, [{"input_ids": padded, "attention_mask": mask}], progress=False)
        )
    for name in stats[0]:
        torch.testing.assert_close(stats[0][name], stats[1][name], atol=1e-6, rtol=0, msg=name)
    q = "model.layers.0.self_attn.q_proj"
    unmasked = [
        nora.calibrate(M.fresh("llama"), cfg, [{"input_ids": ids.masked_fill(mask == 0, pad)}], progress=False)[q]
        for pad in (3, 60)
    ]
    assert not torch.equal(unmasked[0], unmasked[1])


@pytest.mark.parametrize("family", ["llama", "gpt2", "clip"])
def test_statistics_shapes_match_in_features(family):
    model = M.fresh(family)
    stats = nora.calibrate(model, nora.NoraConfig(r=4, r_inner=2), [M.inputs(family)], progress=False)
    modules = dict(model.named_modules())
    assert stats
    for name, value in stats.items():
        module = modules[name]
        n = module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features
        assert value.shape == (n,) and value.dtype == torch.float32 and value.device.type == "cpu"
        assert (value >= 0).all() and torch.isfinite(value).all()
        assert torch.equal(getattr(module, CALIBRATION_ATTR), value)  # attached for get_peft_model
    # every module get_peft_model adapts has statistics
    peft_model = get_peft_model(model, nora.NoraConfig(r=4, r_inner=2, outer_init="awsvd"))
    adapted = {name.removeprefix("base_model.model.") for name, _ in nora_layers(peft_model)}
    assert adapted == set(stats)


def test_calibrate_restores_mode_and_removes_hooks():
    model = MaskedLinear().train()
    nora.calibrate(model, lin_config(), [torch.randn(2, 6)], progress=False)
    assert model.training and not model.lin._forward_pre_hooks

    def broken():
        yield torch.randn(2, 6)
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        nora.calibrate(model, lin_config(), broken(), progress=False)
    assert model.training and not model.lin._forward_pre_hooks


class DropoutLinear(nn.Module):
    """Dropout in front of the target: in train mode `lin` would see 0 or 2x of each input."""

    def __init__(self, n: int = 6, m: int = 5):
        super().__init__()
        self.drop, self.lin = nn.Dropout(0.5), nn.Linear(n, m)

    def forward(self, x):
        return self.lin(self.drop(x))


def test_calibration_runs_in_eval_mode_and_restores_the_callers_mode():
    """The statistics are those of the deterministic (eval) forward even when the model is in train mode, and an eval
    model is left in eval mode (not switched to train)."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    model = DropoutLinear().train()
    stats = nora.calibrate(model, lin_config(), [x], progress=False)
    torch.testing.assert_close(stats["lin"], x.abs().mean(0), atol=1e-6, rtol=0)  # dropout off: exactly mean |x|
    assert model.training and model.drop.training
    model.eval()
    nora.calibrate(model, lin_config(), [x], progress=False)
    assert not model.training and not model.drop.training


def test_calibrated_awsvd_differs_from_svd_and_uses_the_statistics():
    base = M.fresh("llama")
    cfg = nora.NoraConfig(r=8, r_inner=4, outer_init="awsvd")
    stats = nora.calibrate(base, cfg, [M.inputs("llama", seed=s) for s in (11, 12)], progress=False)
    svd_model = get_peft_model(copy.deepcopy(base), nora.NoraConfig(r=8, r_inner=4))
    aw_model = get_peft_model(base, cfg)
    svd_layers, aw_layers = dict(nora_layers(svd_model)), dict(nora_layers(aw_model))
    for name, layer in aw_layers.items():
        W = layer.get_base_layer().weight.detach()
        aw_BA = layer.nora_B["default"] @ layer.nora_A["default"]
        svd_layer = svd_layers[name]
        svd_BA = svd_layer.nora_B["default"] @ svd_layer.nora_A["default"]
        assert not torch.allclose(aw_BA, svd_BA, atol=1e-4), name
        scale = activation_scale(stats[name.removeprefix("base_model.model.")], cfg.awsvd_alpha, cfg.awsvd_eps)
        ref = outer_awsvd(W, scale, 8)
        torch.testing.assert_close(aw_BA, ref.B @ ref.A, atol=1e-5, rtol=0)
        torch.testing.assert_close(svd_BA, outer_svd(W, 8).B @ outer_svd(W, 8).A, atol=1e-5, rtol=0)


def test_reconstruction_report():
    base = M.fresh("llama")
    cfg = nora.NoraConfig(r=8, r_inner=4, outer_init="awsvd")
    nora.calibrate(base, cfg, [M.inputs("llama", seed=s) for s in (11, 12)], progress=False)
    svd_rows = nora.reconstruction_report(get_peft_model(copy.deepcopy(base), nora.NoraConfig(r=8, r_inner=4)))
    aw_rows = nora.reconstruction_report(get_peft_model(base, cfg))
    assert len(aw_rows) == len(svd_rows) == 7
    for svd, aw in zip(svd_rows, aw_rows):
        assert svd["module"] == aw["module"] and aw["r"] == 8 and len(aw["shape"]) == 2
        for row in (svd, aw):
            assert 0 <= row["rel_error"] < 1 and 0 <= row["weighted_error"] < 1
        # each method is optimal for its own norm (Eckart-Young on W and on W S)
        assert aw["weighted_error"] <= svd["weighted_error"] + 1e-6
        assert svd["rel_error"] <= aw["rel_error"] + 1e-6
    uncalibrated = nora.reconstruction_report(get_peft_model(M.fresh("llama"), nora.NoraConfig(r=8, r_inner=4)))
    assert all("weighted_error" not in row and "rel_error" in row for row in uncalibrated)
    assert nora.reconstruction_report(get_peft_model(M.fresh("llama"), nora.NoraConfig(r=8, r_inner=4)), "x") == []


# ---------------------------------------------------------------------------------------------------------------------
# torch.distributed: two gloo ranks, each calibrating on different batches

DIST_CFG = {"r": 8, "r_inner": 4, "outer_init": "awsvd", "svd_method": "randomized"}


def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank 0 and rank 1 see different data (and different batch sizes)."""
    return [M.inputs("llama", seed=100 + 10 * rank + i, batch=2 + rank) for i in range(2)]


def _calibrate_and_build(batches) -> dict[str, dict[str, torch.Tensor]]:
    base = M.build("llama")
    cfg = nora.NoraConfig(**DIST_CFG)
    stats = nora.calibrate(base, cfg, batches, progress=False)
    model = get_peft_model(base, cfg)
    outer = {k: v.detach().clone() for k, v in model.state_dict().items() if ".nora_A." in k or ".nora_B." in k}
    return {"stats": stats, "outer": outer}


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_calibrate_and_build(rank_batches(rank)), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_calibration_agrees_across_ranks(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    assert r0["stats"].keys() == r1["stats"].keys() and len(r0["stats"]) == 7
    for name in r0["stats"]:
        assert torch.equal(r0["stats"][name], r1["stats"][name]), name
    assert r0["outer"].keys() == r1["outer"].keys() and len(r0["outer"]) == 14
    for key in r0["outer"]:
        assert torch.equal(r0["outer"][key], r1["outer"][key]), key

    single = _calibrate_and_build(rank_batches(0) + rank_batches(1))  # one process, the union of the batches
    for name in single["stats"]:
        torch.testing.assert_close(r0["stats"][name], single["stats"][name], atol=1e-6, rtol=0, msg=name)
    for key in single["outer"]:
        torch.testing.assert_close(r0["outer"][key], single["outer"][key], atol=1e-6, rtol=0, msg=key)
    # and the statistics really are global: a rank calibrating alone would get something else
    alone = nora.calibrate(M.build("llama"), nora.NoraConfig(**DIST_CFG), rank_batches(0), progress=False)
    assert not all(torch.allclose(alone[n], single["stats"][n], atol=1e-4) for n in alone)
