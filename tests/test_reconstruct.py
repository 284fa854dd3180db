"""Layer-wise reconstruction of a pruned plain RepVGG (`compress.prune.reconstruct`) and the kept channels `realize`
reports: exact recovery when nothing is pruned (grouped convs and subsampled patches too), kept indices that match
the pruned weights (one step and iterative steps), and a lower logit error after reconstruction on held-out images."""

import copy

import pytest
import torch

import compress.prune.pruning as pruning
import compress.prune.reconstruct as reconstruct_module
from compress.prune import PruneOptions, Target, prune_model
from compress.prune.realize import realize
from compress.prune.reconstruct import reconstruct
from repvgg import LayerSpec, PlainRepVGG

PLAIN = [LayerSpec(3, 8, 2), LayerSpec(8, 16), LayerSpec(16, 16, 2), LayerSpec(16, 16)]
GROUPED = [LayerSpec(3, 8, 2), LayerSpec(8, 16, 1, 2), LayerSpec(16, 16, 2), LayerSpec(16, 16, 1, 2)]
IMAGE = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_thread")


def plain(specs, seed: int = 0) -> PlainRepVGG:
    torch.manual_seed(seed)
    return PlainRepVGG(specs, num_classes=10).eval()


def batches(seed: int, n: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


@torch.no_grad()
def outputs(model: PlainRepVGG, x: torch.Tensor, kept=None) -> list[torch.Tensor]:
    """Every layer's pre-activation output (at `kept` channels) and the logits."""
    outs = []
    for i, layer in enumerate(model.layers):
        pre = layer.conv(x)
        outs.append(pre if kept is None else pre[:, kept[i]])
        x = layer.act(pre)
    return [*outs, model.linear(torch.flatten(model.gap(x), 1))]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def prune(model: PlainRepVGG, monkeypatch, **kwargs) -> list[torch.Tensor]:
    """prune_model to half the channels, returning what its `realize` call reported kept."""
    kept = []

    def spy(*args, **kw):
        kept.extend(realize(*args, **kw))
        return kept

    monkeypatch.setattr(pruning, "realize", spy)
    options = PruneOptions(target=Target("channel_ratio", 0.5), round_to=4, **kwargs)
    prune_model(model, options, IMAGE)
    return kept


def assert_kept_match_weights(model: PlainRepVGG, reference: PlainRepVGG, kept: list[torch.Tensor]) -> None:
    """Each pruned conv is the reference conv at its kept outputs and its kept inputs (per conv group)."""
    assert len(kept) == len(model.layers) and torch.equal(kept[0], torch.arange(8))  # the first layer is kept whole
    cin_kept = torch.arange(3)
    for layer, ref, keep in zip(model.layers, reference.layers, kept):
        assert keep.dtype == torch.long and torch.equal(keep, keep.sort().values)
        conv, rconv, g = layer.conv, ref.conv, ref.conv.groups
        assert conv.out_channels == len(keep) and conv.groups == g
        rw = rconv.weight[keep]
        per_in, new_in, new_out = rconv.in_channels // g, len(cin_kept) // g, len(keep) // g
        for j in range(g):  # group j keeps its own inputs, at in-group positions
            rows, ins = slice(j * new_out, (j + 1) * new_out), cin_kept[j * new_in:(j + 1) * new_in] - j * per_in
            assert ins.min() >= 0 and ins.max() < per_in
            assert torch.equal(conv.weight[rows], rw[rows][:, ins])
        assert torch.equal(conv.bias, rconv.bias[keep])
        cin_kept = keep
    assert torch.equal(model.linear.weight, reference.linear.weight[:, kept[-1]])
    assert torch.equal(model.linear.bias, reference.linear.bias)


@pytest.mark.parametrize("specs", [PLAIN, GROUPED], ids=["plain", "grouped"])
@pytest.mark.parametrize("max_rows", [4096, 512], ids=["all_positions", "subsampled"])
def test_nothing_pruned_reconstructs_the_reference(specs, max_rows, monkeypatch):
    monkeypatch.setattr(reconstruct_module, "MAX_ROWS", max_rows)
    reference = plain(specs)
    model = copy.deepcopy(reference)
    with torch.no_grad():  # start away from the answer: the fit must find the reference's weights again
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    kept = [torch.arange(s.out_channels) for s in specs]
    report = reconstruct(model, reference, kept, batches(3), ridge=1e-8)
    assert report["images"] == 64 and report["ridge"] == 1e-8 and report["seconds"] > 0
    errors = [*report["layers"], report["head"]]
    assert len(errors) == len(specs) + 1
    assert all(e["error_before"] > 1e-2 and e["error_after"] < 1e-4 for e in errors), errors
    held_out = batches(4, n=1, size=32)[0][0]
    for out, ref in zip(outputs(model, held_out), outputs(reference, held_out)):
        assert relative(out, ref) < 1e-4
    assert not model.training and not reference.training


def test_pruned_kept_match_weights_and_reconstruction_lowers_the_logit_error(monkeypatch):
    specs = [LayerSpec(3, 8, 2), LayerSpec(8, 16), LayerSpec(16, 16, 1, 2), LayerSpec(16, 16, 2), LayerSpec(16, 16)]
    reference = plain(specs, seed=1)
    model = copy.deepcopy(reference)
    kept = prune(model, monkeypatch)
    assert model.widths() != reference.widths()
    assert_kept_match_weights(model, reference, kept)

    held_out = batches(6, n=2, size=32)[0][0]
    target = outputs(reference, held_out, kept)
    pruned_only = outputs(model, held_out)
    model.train()
    report = reconstruct(model, reference, kept, batches(5, n=8))
    assert model.training and report["images"] == 128
    errors = [*report["layers"], report["head"]]
    assert errors[0] == {"error_before": 0.0, "error_after": 0.0}  # the first layer kept all: left as it was
    assert all(e["error_after"] <= e["error_before"] + 2e-3 for e in errors), errors  # ridge's bias at most
    rebuilt = outputs(model, held_out)
    before, after = relative(pruned_only[-1], target[-1]), relative(rebuilt[-1], target[-1])
    print(f"held-out logit error: {before:.4f} pruned, {after:.4f} reconstructed; report {report}")
    assert after < 0.7 * before


@pytest.mark.parametrize("importance", ["l2", "random"])
def test_iterative_steps_compose_the_kept_channels(importance, monkeypatch):
    reference = plain(GROUPED + [LayerSpec(16, 16)], seed=2)
    model = copy.deepcopy(reference)
    kept = prune(model, monkeypatch, steps=2, importance=importance)
    assert model.widths() != reference.widths()
    assert_kept_match_weights(model, reference, kept)
