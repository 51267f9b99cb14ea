"""`python -m diffbench.bench peers`: every row runs end to end, and the diffusers peer is the
same network as diffbench's UNet, so the timings compare like with like."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffbench.bench.peers import PEER_NAMES, bench_spec
from diffbench.cli.bench import main
from diffbench.core.unet import AttentionBlock, UNet, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_peers_tiny_runs_every_row(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    path = tmp_path / "p.json"
    assert main(["peers", "--tiny", "--device", "cpu", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {"train/unet_small/fp32", "vlb", "ddim", "ancestral"}
    for row in rows.values():
        assert row["peer"] == PEER_NAMES[row["key"].split("/")[0]]
        for who in ("diffbench_s", "peer_s"):
            assert len(row[who]["rounds"]) == report["rounds"] == 2
            assert row[who]["median"] > 0
        assert row["ratio"]["of_medians"] > 0 and row["ratio"]["min"] <= row["ratio"]["max"]
    train = rows["train/unet_small/fp32"]
    assert train["flops"]["diffbench"] == train["flops"]["peer"] > 0
    assert train["pct_of_ceiling"]["diffbench"] > 0
    assert report["ceilings"]["fp32"]["flop_per_s"] > 0
    counts = report["params"]["unet_small"]
    assert counts["diffbench"] == counts["diffusers"] > 0


def test_diffusers_unet_matches_unet_small_parameter_count() -> None:
    pytest.importorskip("diffusers")
    from diffbench.bench.peers import diffusers_unet

    args = bench_spec("unet_small", []).model.arguments()
    assert count_parameters(UNet(**args)) == count_parameters(diffusers_unet(args)) == 926_817


def test_peers_without_diffusers_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert main(["peers", "--tiny", "--device", "cpu"]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err


def execution_order(net: nn.Module, *inputs: torch.Tensor) -> list[nn.Module]:
    """Modules that own parameters, in the order a forward pass first calls them."""
    seen: list[nn.Module] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, _: None if m in seen else seen.append(m))
        for module in net.modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    net(*inputs)
    for hook in hooks:
        hook.remove()
    return seen


@torch.no_grad()
def test_diffusers_unet_computes_the_same_function_in_tiny_configuration() -> None:
    """Layer for layer the same network: copying diffbench's weights over (its fused qkv split
    into to_q, to_k, to_v) gives the same output, so the peers time identical work."""
    pytest.importorskip("diffusers")
    from diffbench.bench.peers import TINY_MODEL, diffusers_unet

    args = bench_spec("unet_small", TINY_MODEL).model.arguments()
    torch.manual_seed(0)
    ours, theirs = UNet(**args), diffusers_unet(args)
    for parameter in ours.parameters():
        nn.init.normal_(parameter, std=0.1)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 7, 20])
    fused_qkv = {module.qkv for module in ours.modules() if isinstance(module, AttentionBlock)}
    targets = iter(execution_order(theirs, x, t))
    for module in execution_order(ours, x, t):
        pieces = (
            zip(module.weight.chunk(3), module.bias.chunk(3))
            if module in fused_qkv
            else [tuple(module.parameters(recurse=False))]
        )
        for values in pieces:
            for value, target in zip(values, next(targets).parameters(recurse=False)):
                target.copy_(value.reshape(target.shape))
    assert next(targets, None) is None
    torch.testing.assert_close(theirs(x, t), ours(x, t))
