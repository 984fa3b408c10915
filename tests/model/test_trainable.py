"""Per-component trainable policy, parameter counts and optimizer parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from medvlm3d.config import ConfigError, LoRAConfig, TrainablePolicy
from medvlm3d.model.llm import apply_lora
from medvlm3d.model.trainable import (
    apply_trainable_policy,
    count_parameters,
    hold_frozen_in_eval,
    lora_layers,
    stochastic_layers,
    trainable_parameter_groups,
)

HIDDEN = 32


def _llm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _components(lora: bool = True) -> dict[str, nn.Module | None]:
    llm = _llm()
    return {
        "encoder3d": nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16)),
        "slice_encoder": nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)),
        "inter_slice": None,  # absent in this variant
        "tgis": nn.Linear(16, 16),
        "projector": nn.Sequential(nn.Linear(16, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN)),
        "llm": apply_lora(llm, LoRAConfig(r=2)) if lora else llm,
    }


def test_frozen_and_full_counts() -> None:
    comps = _components(lora=False)
    policy = TrainablePolicy(encoder3d="frozen", slice_encoder="full", tgis="full", projector="full", llm="frozen")
    apply_trainable_policy(comps, policy)
    counts = count_parameters(comps)
    assert "inter_slice" not in counts
    assert counts["encoder3d"] == {"trainable": 0, "total": 8 * 16 + 16 + 2 * 16}
    assert counts["slice_encoder"] == {"trainable": 4 * 9 + 4 + 8, "total": 4 * 9 + 4 + 8}
    assert counts["llm"]["trainable"] == 0 and counts["llm"]["total"] == _numel(comps["llm"])
    present = [m for m in comps.values() if m is not None]
    assert counts["total"]["total"] == sum(_numel(m) for m in present)
    assert counts["total"]["trainable"] == sum(r["trainable"] for k, r in counts.items() if k != "total")

    apply_trainable_policy(comps, TrainablePolicy(encoder3d="full", llm="full"))
    counts = count_parameters(comps)
    assert counts["total"]["trainable"] == counts["total"]["total"]


def test_lora_policy_only_adapters_train_and_is_reversible() -> None:
    comps = _components()
    llm = comps["llm"]
    apply_trainable_policy(comps, TrainablePolicy(llm="full"))
    assert all(p.requires_grad for p in llm.parameters())
    apply_trainable_policy(comps, TrainablePolicy(llm="lora"))
    names = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    # q/k/v/o are 32x32 here: r * (in + out) per Linear, 4 per layer, 2 layers
    assert count_parameters({"llm": llm})["llm"]["trainable"] == 2 * 4 * 2 * (HIDDEN + HIDDEN)
    assert len(lora_layers(llm)) == 8
    # the other components followed their own (default "full") policy
    assert all(p.requires_grad for p in comps["tgis"].parameters())


def test_lora_policy_ignores_inactive_adapters() -> None:
    from peft import LoraConfig as PeftLoraConfig

    comps = _components()
    llm = comps["llm"]
    llm.add_adapter("other", PeftLoraConfig(r=3, target_modules=["q_proj"]))
    assert llm.active_adapter == "default"
    apply_trainable_policy(comps, TrainablePolicy(llm="lora"))
    names = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert names and not any(".other." in n for n in names)


def test_lora_policy_without_adapter_fails() -> None:
    comps = _components(lora=False)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        apply_trainable_policy(comps, TrainablePolicy(llm="lora"))


def test_policy_names_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\['decoder'\].*valid names.*encoder3d"):
        apply_trainable_policy({"decoder": nn.Linear(2, 2)}, TrainablePolicy())
    with pytest.raises(ConfigError, match="trainable.tgis"):
        TrainablePolicy(tgis="lora")  # lora is for the LLM only
    with pytest.raises(ValueError, match="total"):
        count_parameters({"total": nn.Linear(2, 2)})


def test_shared_parameter_counted_once_in_total() -> None:
    shared = nn.Linear(4, 4)
    counts = count_parameters({"tgis": shared, "projector": nn.Sequential(shared, nn.Linear(4, 2))})
    assert counts["tgis"]["total"] == 20 and counts["projector"]["total"] == 30
    assert counts["total"]["total"] == 30


def test_parameter_groups_per_component_lr_and_decay() -> None:
    comps = _components()
    apply_trainable_policy(comps, TrainablePolicy(encoder3d="frozen", llm="lora"))
    groups = trainable_parameter_groups(comps, base_lr=1e-3, lr_per_component={"projector": 5e-3, "llm": 2e-4},
                                        weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert not any(n.startswith("encoder3d") or n.startswith("inter_slice") for n in by_name)
    assert by_name["projector"]["lr"] == 5e-3 and by_name["projector/no_decay"]["lr"] == 5e-3
    assert by_name["tgis"]["lr"] == 1e-3 and by_name["llm"]["lr"] == 2e-4
    # biases and norm weights (1-D) are not decayed; matrices are
    assert all(p.ndim <= 1 for n, g in by_name.items() if n.endswith("/no_decay") for p in g["params"])
    assert all(p.ndim >= 2 and g["weight_decay"] == 0.1 for n, g in by_name.items()
               if not n.endswith("/no_decay") for p in g["params"])
    assert {id(p) for p in comps["slice_encoder"][1].parameters()} <= {id(p) for p in by_name["slice_encoder/no_decay"]["params"]}
    # exactly the trainable parameters, each once
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for m in comps.values() if m is not None for p in m.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) and set(ids) == set(trainable)

    opt = torch.optim.AdamW(groups)
    llm = comps["llm"]
    frozen_before = llm.get_input_embeddings().weight.detach().clone()
    ids_in = torch.randint(0, 50, (2, 5))
    loss = llm(input_ids=ids_in, labels=ids_in).loss + comps["projector"](torch.randn(3, 16)).sum()
    loss.backward()
    opt.step()
    assert torch.equal(llm.get_input_embeddings().weight, frozen_before)


def test_parameter_groups_bad_arguments() -> None:
    comps = _components(lora=False)
    with pytest.raises(ValueError, match=r"\['projectr'\].*valid names.*projector"):
        trainable_parameter_groups(comps, 1e-3, {"projectr": 1e-3})
    with pytest.raises(ValueError, match=">= 0"):
        trainable_parameter_groups(comps, 1e-3, {"tgis": -1.0})
    apply_trainable_policy(comps, TrainablePolicy(encoder3d="frozen", slice_encoder="frozen", tgis="frozen",
                                                  projector="frozen", llm="frozen"))
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainable_parameter_groups(comps, 1e-3)


def test_parameter_groups_shared_tensor_joins_one_group() -> None:
    shared = nn.Linear(4, 4)
    groups = trainable_parameter_groups({"tgis": shared, "projector": nn.Sequential(shared, nn.Linear(4, 2))},
                                        base_lr=1e-3, lr_per_component={"projector": 1e-2}, weight_decay=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 4
    assert {g["name"] for g in groups} == {"tgis", "tgis/no_decay", "projector", "projector/no_decay"}
    torch.optim.AdamW(groups)  # accepted as is


def test_frozen_components_hold_their_stochastic_layers_in_eval() -> None:
    class DropPath(nn.Module):  # timm's drop path keeps its rate in `drop_prob`
        drop_prob = 0.1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def block() -> nn.Sequential:
        return nn.Sequential(nn.Conv1d(1, 2, 1), nn.BatchNorm1d(2), nn.Dropout(0.5), DropPath(), nn.LayerNorm(4))

    comps = {"encoder3d": block(), "slice_encoder": block(), "llm": None}
    assert [type(m).__name__ for m in stochastic_layers(comps["encoder3d"])] == ["BatchNorm1d", "Dropout", "DropPath"]
    comps["encoder3d"].requires_grad_(False)
    for m in comps.values():
        if m is not None:
            m.train()
    assert hold_frozen_in_eval(comps) == ["encoder3d"]
    frozen, trained = comps["encoder3d"], comps["slice_encoder"]
    assert frozen.training and not any(m.training for m in frozen[1:4]) and frozen[0].training and frozen[4].training
    assert all(m.training for m in trained.modules())
    # a frozen block uses (and keeps) its running statistics: a row's output ignores the batch
    before = frozen[1].running_mean.clone()
    x = torch.randn(5, 1, 4) + 3.0
    torch.testing.assert_close(frozen(x)[:1], frozen(x[:1]))
    torch.testing.assert_close(frozen[1].running_mean, before)
    assert not torch.allclose(trained(x)[:1], trained(x[:1]))  # the trained one normalises by the batch
    assert hold_frozen_in_eval({"encoder3d": nn.Linear(2, 2)}) == []  # trainable: untouched
