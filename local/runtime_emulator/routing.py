"""Which production variant answers a request: weighted random split, or the one TargetVariant names."""

from __future__ import annotations

import random

from .config import Endpoint, Variant
from .errors import validation_error


def pick_variant(endpoint: Endpoint, rng: random.Random, target_variant: str | None = None) -> Variant:
    """SageMaker semantics: TargetVariant overrides the weights (a weight-0 variant is still reachable
    that way); otherwise each variant gets weight / sum(weights) of the traffic."""
    if target_variant:
        variant = endpoint.variant(target_variant)
        if variant is None:
            names = ", ".join(v.name for v in endpoint.variants)
            raise validation_error(
                f"Variant {target_variant} does not exist on endpoint {endpoint.name} (its variants are: {names})."
            )
        return variant
    if len(endpoint.variants) == 1:
        return endpoint.variants[0]
    return rng.choices(endpoint.variants, weights=[v.weight for v in endpoint.variants], k=1)[0]
