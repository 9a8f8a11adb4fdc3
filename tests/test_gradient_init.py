"""nora.gradient_init (issue 23): the projected gradient B^T G A^T without m x n gradients, inner_init grad (identity,
aligned A') and grad_step (the truncated first update), outer_init grad / LoRA-SB, refusals, torch.distributed.

References are computed independently of nora: autograd's full W.grad on a copy of the base model, projectors from
torch.linalg.pinv, SVDs in W space."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import nora
from conftest import config_kwargs
from nora.gradient_init import accumulate_gradients

R, R_INNER = 6, 3
ETA = 1e-3


class Tiny(nn.Module):
    """Two NoRA targets (lin1 16x12, lin2 14x16) and an untargeted head; returns {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin1, self.lin2, self.head = nn.Linear(12, 16), nn.Linear(16, 14), nn.Linear(14, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.4

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.lin2(torch.tanh(self.lin1(x)))))
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


def batches(seed: int = 1, n: int = 3, size: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, 12, generator=gen), "labels": torch.randint(0, 3, (size,), generator=gen)}
            for _ in range(n)]  # fmt: skip


def reference_grads(base: nn.Module, data) -> dict[str, torch.Tensor]:
    """Mean over batches of autograd's full W.grad of lin1, lin2 (a copy of the base model, nothing of nora)."""
    ref = copy.deepcopy(base)
    sums = {}
    for batch in data:
        ref.zero_grad()
        ref(**batch)["loss"].backward()
        for name in ("lin1", "lin2"):
            g = getattr(ref, name).weight.grad.clone()
            sums[name] = sums.get(name, 0) + g
    return {k: v / len(data) for k, v in sums.items()}


def build(**cfg):
    base = Tiny()
    config = nora.NoraConfig(
        **config_kwargs(r=R, r_inner=R_INNER, target_modules=["lin1", "lin2"], svd_method="full", **cfg)
    )
    return base, config, get_peft_model(copy.deepcopy(base), config)


def layers(model):
    return {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, nora.NoraLayer)}


def projector_cols(M: torch.Tensor) -> torch.Tensor:
    return M @ torch.linalg.pinv(M)


def truncate(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def projected(model, name: str, G: torch.Tensor) -> torch.Tensor:
    """The gradient seen in the outer subspaces: P_B G P_A (projectors onto col(B) and row(A))."""
    layer = layers(model)[name]
    B, A = layer.nora_B["default"], layer.nora_A["default"]
    return projector_cols(B) @ G @ projector_cols(A.T)


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outer_scaling", ["sigma", "orthonormal"])
def test_projected_gradient_equals_projection_of_autograds_full_weight_gradient(outer_scaling):
    base, _, model = build(inner_init="grad", outer_scaling=outer_scaling)
    data = batches()
    got = accumulate_gradients(model, data, progress=False)
    for name, G in reference_grads(base, data).items():
        layer = layers(model)[name]
        B, A = layer.nora_B["default"], layer.nora_A["default"]
        expected = B.T @ G @ A.T
        assert expected.abs().max() > 1e-3  # a real signal
        torch.testing.assert_close(got[f"base_model.model.{name}"], expected, atol=1e-6, rtol=1e-5)
    # no m x n gradient was formed, and the model is left as it was
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if "nora_inner" in n
    }
    assert model.training


def test_full_estimator_returns_autograds_weight_gradient():
    base, _, model = build(inner_init="grad", grad_estimator="sign")
    data = batches()
    got = accumulate_gradients(model, data, full=True, progress=False)
    for name, G in reference_grads(base, data).items():
        torch.testing.assert_close(got[f"base_model.model.{name}"], G, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("outer", ["svd", "awsvd"])
def test_inner_grad_is_an_identity_and_aligns_a_with_the_top_right_singular_directions(outer):
    base = Tiny()
    config = nora.NoraConfig(r=R, r_inner=R_INNER, target_modules=["lin1", "lin2"], svd_method="full",
                             inner_init="grad", outer_init=outer)  # fmt: skip
    work = copy.deepcopy(base)
    data = batches()
    if outer == "awsvd":  # R_A != I: A = V^T S^-1 is not orthonormal
        nora.calibrate(work, config, [{"x": b["x"], "labels": b["labels"]} for b in data], progress=False)
    model = get_peft_model(work, config)
    with pytest.raises(RuntimeError, match=r"nora.gradient_init\(model, config, batches\)"):
        model(**data[0])  # placeholders until gradient_init runs
    nora.gradient_init(model, config, data, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0])["logits"], base(**data[0])["logits"], atol=0, rtol=0)
    for name, G in reference_grads(base, data).items():
        layer = layers(model)[name]
        assert torch.count_nonzero(layer.nora_inner_B["default"]) == 0
        inner_A = layer.nora_inner_A["default"].detach()
        torch.testing.assert_close(inner_A.norm(), torch.tensor(0.1 * (R * R_INNER) ** 0.5), atol=1e-5, rtol=0)
        right = inner_A @ layer.nora_A["default"]  # (r', n): the input directions the first B' step acts on
        _, _, Vh = torch.linalg.svd(projected(model, name, G))
        expected = Vh[:R_INNER].T @ Vh[:R_INNER]
        torch.testing.assert_close(projector_cols(right.T), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("estimator", ["projected", "sign"])
def test_grad_step_starts_at_the_truncated_first_update(estimator):
    base, config, model = build(inner_init="grad_step", grad_estimator=estimator, grad_first_step_lr=ETA)
    data = batches()
    nora.gradient_init(model, config, data, progress=False)
    for name, G in reference_grads(base, data).items():
        if estimator == "projected":  # normalised surrogate: the norm of one sign step on an r x r core
            K = projected(model, name, G)
            target = -ETA * R * K / K.norm()
        else:  # LoRA-SB's -eta sign(G), seen in the outer subspaces
            target = projected(model, name, -ETA * torch.sign(G))
        delta = layers(model)[name].get_delta_weight("default")
        torch.testing.assert_close(delta, truncate(target, R_INNER), atol=1e-7, rtol=1e-4)
        assert delta.norm() > 0.1 * ETA


def test_lorasb_init_is_the_truncated_sign_update_with_a_diagonal_core():
    """structure adapter + outer grad + grad_step + sign (LoRA-SB): B = U_r, A = V_r^T, R = diag(S_r) (s = 1)."""
    base, config, model = build(structure="adapter", outer_init="grad", outer_scaling="orthonormal",
                                inner_init="grad_step", grad_estimator="sign", grad_first_step_lr=ETA)  # fmt: skip
    data = batches()
    nora.gradient_init(model, config, data, progress=False)
    for name, G in reference_grads(base, data).items():
        layer = layers(model)[name]
        update = -ETA * torch.sign(G)
        _, S, _ = torch.linalg.svd(update)
        core = layer.nora_inner_B["default"].detach()
        torch.testing.assert_close(core, torch.diag(S[:R]), atol=1e-7, rtol=1e-4)
        B, A = layer.nora_B["default"], layer.nora_A["default"]
        torch.testing.assert_close(B.T @ B, torch.eye(R), atol=1e-5, rtol=0)
        torch.testing.assert_close(A @ A.T, torch.eye(R), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.get_delta_weight("default"), truncate(update, R), atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(layer.get_base_layer().weight, getattr(base, name).weight)  # W unchanged


def test_outer_grad_with_zeros_inner_keeps_identity():
    base, config, model = build(outer_init="grad", outer_scaling="orthonormal", grad_estimator="sign")
    data = batches()
    nora.gradient_init(model, config, data, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0])["logits"], base(**data[0])["logits"], atol=0, rtol=0)
    for name, G in reference_grads(base, data).items():
        B = layers(model)[name].nora_B["default"]
        U, _, _ = torch.linalg.svd(torch.sign(G), full_matrices=False)
        torch.testing.assert_close(projector_cols(B), U[:, :R] @ U[:, :R].T, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"structure": "adapter", "inner_init": "grad"}, r"structure='adapter' has a single r x r core"),
        ({"structure": "output", "inner_init": "grad"}, r"support structure 'nested' and 'adapter'"),
        ({"outer_init": "grad", "outer_scaling": "orthonormal"}, r"set grad_estimator='sign'"),
        ({"outer_init": "grad", "grad_estimator": "sign"}, r"set outer_scaling='orthonormal'"),
        ({"inner_init": "grad_step"}, r"set grad_first_step_lr > 0"),
        ({"grad_estimator": "exact"}, r"unknown grad_estimator='exact'"),
        (
            {
                "outer_init": "grad",
                "outer_scaling": "orthonormal",
                "grad_estimator": "sign",
                "save_outer_factors": False,
            },
            r"(?i)keep save_outer_factors=True",
        ),
    ],
)
def test_gradient_init_config_refusals(cfg, match):
    with pytest.raises(ValueError, match=match):
        nora.NoraConfig(**cfg)


def test_gradient_init_refusals():
    base, config, model = build(inner_init="grad")
    with pytest.raises(ValueError, match=r"need no gradient"):
        plain = nora.NoraConfig(r=R, r_inner=R_INNER, target_modules=["lin1", "lin2"])
        nora.gradient_init(get_peft_model(copy.deepcopy(base), plain), plain, batches(), progress=False)
    with pytest.raises(ValueError, match=r"has no adapter 'other'"):
        nora.gradient_init(model, config, batches(), adapter_name="other", progress=False)
    with pytest.raises(ValueError, match=r"yielded no batches"):
        nora.gradient_init(model, config, [], progress=False)
    with pytest.raises(ValueError, match=r"returned no loss"):
        nora.gradient_init(model, config, [{"x": torch.randn(2, 12)}], progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# torch.distributed: two gloo ranks, each on different batches, equal one process on the union


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, config, model = build(inner_init="grad_step", grad_first_step_lr=ETA)
        nora.gradient_init(model, config, batches(seed=10 + rank, n=2), progress=False)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items() if "nora_" in k},
                   f"{out_dir}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_distributed_gradient_init_equals_one_process_on_all_batches(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # broadcast from rank 0: bit-identical
    _, config, single = build(inner_init="grad_step", grad_first_step_lr=ETA)
    nora.gradient_init(single, config, batches(seed=10, n=2) + batches(seed=11, n=2), progress=False)
    for name, layer in layers(single).items():  # singular-vector signs may differ from one process: compare dW
        f = {k.rsplit(".", 2)[-2]: v for k, v in r0.items() if f".{name}." in k}
        dW = f["nora_B"] @ f["nora_inner_B"] @ f["nora_inner_A"] @ f["nora_A"]
        assert dW.norm() > 0.1 * ETA
        torch.testing.assert_close(dW, layer.get_delta_weight("default"), atol=1e-7, rtol=1e-4)
