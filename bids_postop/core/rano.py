"""RANO resect classes: the extent of resection of a glioblastoma from residual and pre-operative tumour volumes.

The RANO resect group's "RANO categories for extent of resection in glioblastoma" (Karschnia et al.,
Neuro-Oncology 2023;25(5):940-954, doi:10.1093/neuonc/noac193) rest on absolute residual volumes only (1 ml =
1 cm³); the pre-operative volume only tells a biopsy (no reduction of tumour volume) from a resection:

======  ==========================  =================================================================
class   name                        definition
======  ==========================  =================================================================
1       supramaximal CE resection   0 cm³ residual contrast-enhancing (CE) tumour and ≤ 5 cm³ non-CE
2A      complete CE resection       0 cm³ residual CE tumour and > 5 cm³ non-CE
2B      near total CE resection     ≤ 1 cm³ residual CE tumour
3A      subtotal CE resection       ≤ 5 cm³ residual CE tumour
3B      partial CE resection        > 5 cm³ residual CE tumour
4       biopsy                      no reduction of tumour volume
======  ==========================  =================================================================

The 2021 proposal's percentage conditions (Karschnia et al., Eur J Cancer 2021;149:23-33: near total 95-99.9 %,
subtotal 80-94.9 %, partial < 80 %) are not part of the 2023 classes and are not used. docs/rano.md has the
sources, the quotes and how the study's GTR cut-off maps onto "0 cm³".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from bids_postop.core.postprocess import GTR_CUTOFF_ML

RanoClass = Literal["1", "2A", "2B", "3A", "3B", "4", "1/2A"]

NEAR_TOTAL_MAX_ML = 1.0  # class 2B: residual CE ≤ 1 cm³
SUBTOTAL_MAX_ML = 5.0  # class 3A: residual CE ≤ 5 cm³ (3B above)
SUPRAMAXIMAL_NONCE_MAX_ML = 5.0  # class 1: residual non-CE ≤ 5 cm³ (2A above)


@dataclass(frozen=True)
class RanoResult:
    """One patient's RANO resect class and why.

    Attributes
    ----------
    rano_class
        ``"1"``, ``"2A"``, ``"2B"``, ``"3A"``, ``"3B"``, ``"4"``; ``"1/2A"`` for a complete CE resection whose
        non-enhancing residual is unknown (class 1 or 2A); ``None`` when the inputs do not allow a class.
    rule
        Short identifier of the rule that decided (``"supramaximal"``, ``"complete_ce"``,
        ``"complete_ce_nonce_unknown"``, ``"near_total"``, ``"subtotal"``, ``"partial"``, ``"biopsy"``,
        ``"preop_unknown"``, ``"no_preop_ce"``).
    reason
        One sentence with the volumes and thresholds that decided, for reports.
    """

    rano_class: RanoClass | None
    rule: str
    reason: str

    @property
    def label(self) -> str:
        """The class for a TSV cell: the class, or ``"n/a"``."""
        return "n/a" if self.rano_class is None else self.rano_class

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _volume(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite volume >= 0 ml; got {value}")
    return value


def counts_as_zero_ce(residual_ce_ml: float, *, zero_ce_cutoff_ml: float = GTR_CUTOFF_ML,
                      zero_ce_inclusive: bool = False) -> bool:
    """True when a residual CE volume counts as "0 cm³" (complete CE resection).

    Exactly 0 ml always counts. By default a residual below the study's GTR cut-off (0.175 ml) also counts:
    GTR ↔ complete CE resection. ``zero_ce_inclusive`` makes a residual of exactly the cut-off count too (the
    study's code; see ``classify_resection(gtr_inclusive=...)``). ``zero_ce_cutoff_ml=0`` is the literal reading.
    """
    if residual_ce_ml <= 0.0:
        return True
    return residual_ce_ml <= zero_ce_cutoff_ml if zero_ce_inclusive else residual_ce_ml < zero_ce_cutoff_ml


def rano_resect_class(residual_ce_ml: float, preop_ce_ml: float | None, *, residual_nonce_ml: float | None = None,
                      zero_ce_cutoff_ml: float = GTR_CUTOFF_ML, zero_ce_inclusive: bool = False,
                      assume_resection: bool = False, biopsy_tolerance_ml: float = 0.0) -> RanoResult:
    """RANO resect class (Karschnia et al. 2023) from residual and pre-operative volumes.

    Parameters
    ----------
    residual_ce_ml
        Residual contrast-enhancing tumour volume on the early post-operative MRI, ml (= cm³).
    preop_ce_ml
        Pre-operative CE tumour volume, ml; ``None`` when unknown. Needed only to tell class 4 (biopsy: no
        reduction of tumour volume) from classes 2B/3A/3B; a complete CE resection needs no pre-operative volume.
    residual_nonce_ml
        Residual non-enhancing (T2/FLAIR) tumour volume, ml; ``None`` when unknown. Separates class 1 from 2A;
        without it a complete CE resection is reported as ``"1/2A"``.
    zero_ce_cutoff_ml
        Residual CE volumes below this count as "0 cm³ CE tumour". Default: the study's GTR cut-off, 0.175 ml, so
        that GTR ↔ complete CE resection; ``0.0`` counts only an empty residual. Must lie in [0, 1] ml (a larger
        value would overlap class 2B).
    zero_ce_inclusive
        Count a residual of exactly ``zero_ce_cutoff_ml`` as zero too (mirrors ``gtr_inclusive``).
    assume_resection
        When the pre-operative volume is unknown, assert that the operation was a resection, not a biopsy, so
        that 2B/3A/3B can be given. A known pre-operative volume always decides.
    biopsy_tolerance_ml
        A residual CE volume ≥ ``preop_ce_ml - biopsy_tolerance_ml`` counts as "no reduction" (class 4). Default
        0: only a residual at least as large as the pre-operative volume.

    Returns
    -------
    RanoResult
        The class (``None`` when not determinable), the deciding rule and a reason.

    Raises
    ------
    ValueError
        A volume is negative or not finite, or a parameter is out of range.
    """
    residual = _volume("residual_ce_ml", residual_ce_ml)
    preop = None if preop_ce_ml is None else _volume("preop_ce_ml", preop_ce_ml)
    nonce = None if residual_nonce_ml is None else _volume("residual_nonce_ml", residual_nonce_ml)
    if not 0.0 <= zero_ce_cutoff_ml <= NEAR_TOTAL_MAX_ML:
        raise ValueError(f"zero_ce_cutoff_ml must lie in [0, {NEAR_TOTAL_MAX_ML}] ml; got {zero_ce_cutoff_ml}")
    if not (math.isfinite(biopsy_tolerance_ml) and biopsy_tolerance_ml >= 0):
        raise ValueError(f"biopsy_tolerance_ml must be >= 0 ml; got {biopsy_tolerance_ml}")
    res = f"residual CE {residual:g} ml"

    if preop is not None and preop <= 0.0:
        return RanoResult(None, "no_preop_ce", f"no pre-operative CE tumour ({preop:g} ml): the CE-based RANO "
                                               f"classes do not apply")
    if preop is not None and residual >= preop - biopsy_tolerance_ml:
        return RanoResult("4", "biopsy", f"{res} >= pre-operative CE {preop:g} ml"
                          + (f" - {biopsy_tolerance_ml:g} ml" if biopsy_tolerance_ml else "")
                          + ": no reduction of tumour volume (biopsy)")
    if counts_as_zero_ce(residual, zero_ce_cutoff_ml=zero_ce_cutoff_ml, zero_ce_inclusive=zero_ce_inclusive):
        zero = (f"{res} counts as 0 cm³ ({'<=' if zero_ce_inclusive else '<'} {zero_ce_cutoff_ml:g} ml)"
                if residual > 0 else f"{res}")
        if nonce is None:
            return RanoResult("1/2A", "complete_ce_nonce_unknown",
                              f"complete CE resection: {zero}; residual non-CE volume unknown (class 1 or 2A)")
        if nonce <= SUPRAMAXIMAL_NONCE_MAX_ML:
            return RanoResult("1", "supramaximal", f"supramaximal CE resection: {zero} and residual non-CE "
                                                   f"{nonce:g} ml <= {SUPRAMAXIMAL_NONCE_MAX_ML:g} cm³")
        return RanoResult("2A", "complete_ce", f"complete CE resection: {zero} and residual non-CE {nonce:g} ml "
                                               f"> {SUPRAMAXIMAL_NONCE_MAX_ML:g} cm³")
    if preop is None and not assume_resection:
        return RanoResult(None, "preop_unknown", f"{res} > 0 cm³ and the pre-operative CE volume is unknown: "
                                                 f"a biopsy (class 4, no reduction) cannot be excluded")
    if residual <= NEAR_TOTAL_MAX_ML:
        return RanoResult("2B", "near_total", f"near total CE resection: {res} <= {NEAR_TOTAL_MAX_ML:g} cm³")
    if residual <= SUBTOTAL_MAX_ML:
        return RanoResult("3A", "subtotal", f"subtotal CE resection: {res} <= {SUBTOTAL_MAX_ML:g} cm³")
    return RanoResult("3B", "partial", f"partial CE resection: {res} > {SUBTOTAL_MAX_ML:g} cm³")
