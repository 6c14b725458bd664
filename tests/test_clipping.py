"""The clippings (anadp.clipping) behind their one interface: whitened, global and per-layer."""
import math

import torch

from anadp.clipping import AdaptiveClipping, FlatClipping, PerLayerClipping

INTERFACE = ("factors", "total", "noise_total", "noise_multipliers", "released", "release", "public_shares",
             "charged", "whitens", "exact_budget", "privacy_settings", "state_dict", "load_state_dict",
             "reset_counts")


def test_every_clipping_has_the_interface_the_optimizer_reads():
    clippings = [FlatClipping(1.0), FlatClipping(1.0, whitened=False),
                 PerLayerClipping(1.0, ["a", "b"], True), PerLayerClipping(1.0, ["a"], False, AdaptiveClipping())]
    missing = [(type(c).__name__, k) for c in clippings for k in INTERFACE if not hasattr(c, k)]
    assert not missing


def test_flat_clipping_factors_and_charge():
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(50, generator=g) * 3
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    flat = FlatClipping(1.5)
    assert torch.allclose(flat.factors(norms), torch.minimum(torch.ones(50), 1.5 / (norms + 1e-6)))
    assert flat.noise_total(w) == 1.5 and flat.charged(0.8, w) == 0.8 and flat.exact_budget
    glob = FlatClipping(1.5, whitened=False)
    assert math.isclose(glob.charged(0.8, w), 0.4) and not glob.exact_budget and not glob.whitens


def test_per_layer_factors_of_several_groups_equal_one_group_at_a_time():
    """The factors and the adaptive counts of groups clipped together (small groups) are those of the
    groups clipped one by one (large ones)."""
    g = torch.Generator().manual_seed(1)
    names = ["a", "b", "c", "d"]
    together = PerLayerClipping({"a": 0.3, "b": 0.5, "c": 0.1, "d": 0.7, "<rest>": 0.2}, names, True,
                                AdaptiveClipping())
    alone = PerLayerClipping({"a": 0.3, "b": 0.5, "c": 0.1, "d": 0.7, "<rest>": 0.2}, names, True,
                             AdaptiveClipping())
    norms = torch.rand(3, 64, generator=g)
    groups = [2, 0, 4]
    c = together.factors(norms, groups)
    for k, grp in enumerate(groups):
        assert torch.equal(c[k:k + 1], alone.factors(norms[k:k + 1], [grp]))
    assert torch.equal(together.counts, alone.counts) and bool((together.counts != 0).any())
    C = together.thresholds[groups].float()[:, None]
    assert torch.allclose(c, torch.minimum(torch.ones_like(norms), C / (norms + 1e-6)))


def test_per_layer_noise_norm_and_public_shares():
    clip = PerLayerClipping([0.3, 0.4], ["a", "b"], False)  # no rest group: its column is 0
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    K = math.sqrt((0.3 / 0.5) ** 2 + (0.4 / 2.0) ** 2)
    assert math.isclose(clip.noise_total(w), K)
    shares = clip.public_shares(w, 128.0)
    assert torch.allclose(shares, 128.0 * torch.tensor([(0.6) ** 2, 0.2 ** 2, 0.0], dtype=torch.float64) / K ** 2)
    assert math.isclose(clip.total, 0.5)
