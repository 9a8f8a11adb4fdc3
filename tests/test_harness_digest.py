"""nora.harness.digest: the per-rank digest of the frozen outer factors recorded in metrics.json (outer_sha256)."""

from __future__ import annotations

import torch
from peft import get_peft_model

import _models as M
import nora
from nora.harness.digest import outer_factor_digest, rank_digests


def test_digest_covers_every_outer_factor_and_only_them():
    model = get_peft_model(M.fresh("llama"), nora.NoraConfig(r=8, r_inner=4, init_weights=False))
    first = outer_factor_digest(model)
    assert len(first) == 64 and rank_digests(model) == [first]  # no process group: one digest
    again = get_peft_model(M.fresh("llama"), nora.NoraConfig(r=8, r_inner=4, init_weights=False))
    assert outer_factor_digest(again) == first  # deterministic SVD: same factors, same digest
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.nora_inner_B["default"].add_(1.0)  # trained factors are not part of it
    assert outer_factor_digest(model) == first
    a = layer.nora_A["default"]
    with torch.no_grad():
        a.view(-1)[0] = torch.nextafter(a.view(-1)[0], torch.tensor(float("inf")))  # one ulp in one outer factor
    assert outer_factor_digest(model) != first
    assert outer_factor_digest(M.fresh("llama")) is None  # no NoRA layers
