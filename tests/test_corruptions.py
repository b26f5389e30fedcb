"""Corruption domains: fixed, seeded corrupted copies whose distortion grows with severity, as a stream."""

from __future__ import annotations

import pytest
import torch

from clframe.data.corruptions import CORRUPTIONS, DEFAULT_CORRUPTIONS, corrupt
from clframe.data.datamodule import ContinualDataModule
from clframe.data.scenarios import ScenarioError, domain_incremental
from clframe.data.sources import SourceData


def _images(n: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=gen), size=(32, 32), mode="bilinear")
    return (smooth * 200 + 20).round().to(torch.uint8)


@pytest.mark.parametrize("name", [c for c in CORRUPTIONS if c != "none"])
def test_each_corruption_is_seeded_and_grows_with_severity(name):
    x = _images()
    out = [corrupt(x, name, s, seed=1) for s in range(1, 6)]
    assert all(o.dtype == torch.uint8 and o.shape == x.shape for o in out)
    assert torch.equal(out[2], corrupt(x, name, 3, seed=1))  # same seed, same copy
    distance = [float((o.float() - x.float()).abs().mean()) for o in out]
    assert distance[0] > 0
    assert distance[-1] > distance[0], f"{name}: severity 5 should distort more than severity 1 ({distance})"


def test_noise_differs_between_seeds_but_not_deterministic_corruptions():
    x = _images()
    assert not torch.equal(corrupt(x, "gaussian_noise", 3, seed=1), corrupt(x, "gaussian_noise", 3, seed=2))
    assert torch.equal(corrupt(x, "contrast", 3, seed=1), corrupt(x, "contrast", 3, seed=2))
    assert torch.equal(corrupt(x, "none", 3, seed=1), x)


def _source() -> SourceData:
    x = _images(40)
    y = torch.arange(40) % 4
    return SourceData(name="toy", train_x=x, train_y=y, test_x=x[:20], test_y=y[:20],
                      class_names=[str(i) for i in range(4)], mean=(0.5,) * 3, std=(0.25,) * 3)


def test_a_corruption_stream_has_one_fixed_domain_per_task():
    stream = domain_incremental(_source(), kind="corruption", corruptions=["none", "gaussian_noise", "contrast"],
                                severity=4, seed=3)
    assert [t.domain for t in stream.tasks] == ["clean", "gaussian_noise_4", "contrast_4"]
    assert stream.scenario == "domain" and stream.num_classes == 4
    first = stream.tasks[1].train.__getitems__(list(range(8)))[0]
    again = stream.tasks[1].train.__getitems__(list(range(8)))[0]
    assert torch.equal(first, again)  # a fixed copy: the same noise in every epoch
    clean = stream.tasks[0].train.__getitems__(list(range(8)))[0]
    assert not torch.equal(first, clean)
    rebuilt = domain_incremental(_source(), kind="corruption", corruptions=["none", "gaussian_noise", "contrast"],
                                 severity=4, seed=3)
    assert torch.equal(rebuilt.tasks[1].test.__getitems__([0, 1])[0], stream.tasks[1].test.__getitems__([0, 1])[0])


def test_bad_corruption_settings_are_refused():
    with pytest.raises(ScenarioError, match="unknown corruption"):
        domain_incremental(_source(), kind="corruption", corruptions=["fog"])
    with pytest.raises(ScenarioError, match="one task per corruption"):
        domain_incremental(_source(), kind="corruption", corruptions=["contrast"], n_tasks=2)
    with pytest.raises(ScenarioError, match="severity"):
        domain_incremental(_source(), kind="corruption", corruptions=["contrast"], severity=6)


def test_the_data_module_builds_corruption_streams_from_a_source():
    data = ContinualDataModule(source="digits", scenario="domain", domain="corruption", n_tasks=3,
                               train_samples_per_class=5, test_samples_per_class=3)
    data.setup()
    assert [t.domain for t in data.stream.tasks] == [f"{c}_3" for c in DEFAULT_CORRUPTIONS[:3]]
