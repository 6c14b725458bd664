"""The names of the DP configurations that the demo, the fine-tune and the studies compare, and the
make_private arguments of each: one place, so that a name means the same everywhere.

An allocation name (uniform, anadp, clip, paper) is that allocation under whitened clipping with
Adam's noise correction off: ``uniform`` is DP-SGD / DP-Adam as Opacus has it, ``anadp`` make_private's
default configuration. ``<allocation>-bc`` adds the correction.
"""
from __future__ import annotations

from ..allocation import ALLOCATIONS
from ..clipping import AdaptiveClipping

PER_LAYER = ("per_layer", "per_layer-anadp", "per_layer-adaptive", "per_layer-anadp-adaptive",
             "per_layer-shares", "per_layer-anadp-shares")
CORRECTED = ("uniform-bc", "anadp-bc")  # with Adam's noise correction (adam_noise_correction=True)
METHODS = ("nonprivate",) + ALLOCATIONS + ("paper-global",) + PER_LAYER + CORRECTED


def method_setup(method: str) -> dict:
    """make_private's allocation and clipping arguments of a DP method name: an allocation (whitened
    clipping); "paper-global", the paper's mechanism (one global clip, noise per group, charged
    sigma * min_g w_g: its epsilon ends above the target); "per_layer[-anadp][-adaptive|-shares]":
    per-layer clipping with equal thresholds C / sqrt(G) (or adaptive ones: each at its group's median,
    Andrew et al.'s, or "shares" of a fixed total C, make_private's adaptive default), uniform noise
    (or anadp's);
    "<allocation>-bc": with Adam's noise correction."""
    if method in CORRECTED:
        return method_setup(method[:-len("-bc")]) | {"adam_noise_correction": True}
    if method == "paper-global":
        return {"allocation": "paper", "clipping": "global", "adam_noise_correction": False}
    if method in PER_LAYER:
        adaptive = (AdaptiveClipping(fixed_total=True) if method.endswith("-shares")
                    else AdaptiveClipping(fixed_total=False) if method.endswith("-adaptive") else None)
        return {"allocation": "anadp" if "-anadp" in method else "uniform", "clipping": "per_layer",
                "adaptive_clipping": adaptive, "adam_noise_correction": False}
    if method not in ALLOCATIONS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return {"allocation": method, "clipping": "whitened", "adam_noise_correction": False}


def uses_anadp(method: str) -> bool:
    """Whether the method's noise scales are anadp's (the runs whose w_g a plot shows)."""
    return method != "nonprivate" and method_setup(method)["allocation"] == "anadp"


DEFAULT = "anadp"  # make_private's defaults: anadp, whitened clipping, no noise correction (README: the study)
