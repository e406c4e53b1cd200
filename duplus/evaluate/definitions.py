"""The segmentation metrics' definitions in words, for the tables that show them (no heavy imports:
the report reads this). ``duplus.evaluate.metrics`` computes what this says."""

from __future__ import annotations

from duplus.settings import schema_default

# evaluate.nsd_tolerance_mm's default, for the functions that take a tolerance and callers without a config.
DEFAULT_NSD_TOLERANCE_MM = float(schema_default("evaluate", "nsd_tolerance_mm"))


def definitions_note(nsd_tolerance_mm: float) -> str:
    """How HD95, NSD and empty masks are scored, at ``nsd_tolerance_mm``, as one table note."""
    tolerance = f"{float(nsd_tolerance_mm):g} mm"
    return (f"Surfaces are area-weighted surface elements, as in DeepMind's surface-distance (Nikolov et al. 2021). "
            f"HD95: the larger of the two directed 95th percentiles of surface distance, in mm on the label's grid. "
            f"NSD: normalised surface Dice at a tolerance of {tolerance}, the share of both surfaces' area lying "
            f"within {tolerance} of the other surface. Empty masks: a class absent from both prediction and truth "
            f"scores Dice 1, HD95 0 mm and NSD 1 (as BraTS counts it); present in only one of them, Dice 0, NSD 0 "
            f"and no HD95 (left out of the HD95 mean).")
