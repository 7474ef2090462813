"""The refresh study's schedules, by name: the baselines, every candidate default (a loser stays
listed, so the table reports it), and what a name changes besides the refresh policy (SOAP's options,
another optimizer, other betas).

``scripts/refresh_study.py`` runs them; ``scripts/refresh_report.py`` orders and pairs their rows.
"""

from __future__ import annotations

import lightning_kron as lk
from lightning_kron.scheduling.budget_policies import BudgetRefresh
from scripts.refresh_candidates import RelativeRefresh, SmallFactorsOnClock, WholeBlocks


def _plain(**budget) -> BudgetRefresh:
    """The budget ranked by staleness alone (``age_power=0``) at a flat late rate, as it was before
    the aged ranking and the taper."""
    return BudgetRefresh(age_power=0.0, late_taper=1.0, **budget)


def _flat(**budget) -> BudgetRefresh:
    """The budget at a flat late rate (``late_taper=1``), as it was before the taper."""
    return BudgetRefresh(late_taper=1.0, **budget)


def schedules(steps: int) -> dict[str, object]:
    """Baselines, then every candidate default (a loser stays listed: the table reports it)."""
    def default(**changes) -> BudgetRefresh:
        """SOAP's default budget for a run of ``steps``, with ``changes``."""
        return BudgetRefresh(**{"every": 20, "front_load": 3.0, "early_fraction": 0.2, "total_steps": steps, **changes})

    return {
        "every10": lk.FixedRefresh(every=10),
        "every1": lk.FixedRefresh(every=1),
        "every20": lk.FixedRefresh(every=20),
        # ranked by staleness alone (age_power=0), as the budget was before the aged ranking won
        "budget20-front": _plain(every=20, front_load=2.0, early_fraction=0.25, total_steps=steps),
        "budget20-flat": _plain(every=20, front_load=1.0, total_steps=steps),
        # SOAP(params) alone does not know the length: an even spread, or the early rate for 30 steps
        "bare-flat": _plain(every=20, front_load=1.0),
        "bare-early30": _plain(every=20, front_load=3.0, early_steps=30),
        "budget20-front-check5-qr3": _plain(every=20, front_load=2.0, early_fraction=0.25, total_steps=steps,
                                            check_every=5, max_iters=3, tolerance=0.02),
        "budget20-front3": _plain(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps),
        "budget20-front1.5": _plain(every=20, front_load=1.5, early_fraction=0.3, total_steps=steps),
        # the aged ranking (age_power=1), flat; before it, budget20-front3
        "budget20-front3-aged": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps),
        "budget10-front3-aged": _flat(every=10, front_load=3.0, early_fraction=0.2, total_steps=steps),
        "bare-early30-aged": _flat(every=20, front_load=3.0, early_steps=30),
        "budget20-front5-aged": _flat(every=20, front_load=5.0, early_fraction=0.1, total_steps=steps),
        "budget20-front4-aged": _flat(every=20, front_load=4.0, early_fraction=0.15, total_steps=steps),
        "budget20-front3-aged2": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps,
                                       age_power=2.0),
        "budget20-front3-aged0.5": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps,
                                         age_power=0.5),
        # its stored runs predate the carry-over of what a check's cap holds back (0.39x every=10's count)
        "budget20-front3-aged-check10": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps,
                                              check_every=10),
        # the default: aged, the late rate tapered to a quarter (late_taper=0.25); then changes to it
        "budget20-front3-aged-taper": default(),
        # deciding every 10 steps (one host sync per 10 steps), the held-back budget carried over
        "budget20-front3-aged-taper-check10": default(check_every=10),
        "budget20-front3-aged-taper0": default(late_taper=0.0),
        "budget20-front2-aged-taper": default(front_load=2.0),
        "budget20-front4-aged-taper": default(front_load=4.0),
        # a second (third) warm-QR iteration in every refresh: better bases per refresh
        "budget20-front3-aged-taper-qr2": default(max_iters=2),
        "budget20-front3-aged-taper-qr3": default(max_iters=3),
        "budget20-front2-aged-taper0": default(front_load=2.0, late_taper=0.0),
        "budget20-front2-aged-taper-qr2": default(front_load=2.0, max_iters=2),
        "budget20-front2-aged-taper0-qr2": default(front_load=2.0, late_taper=0.0, max_iters=2),
        "budget20-front2-aged-taper0-check5": default(front_load=2.0, late_taper=0.0, check_every=5),
        "budget20-front2-aged-taper0-check10": default(front_load=2.0, late_taper=0.0, check_every=10),
        "budget20-front1.5-aged-taper": default(front_load=1.5),
        "budget20-front2-early0.1-aged-taper": default(front_load=2.0, early_fraction=0.1),
        "budget20-front3-age8": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps,
                                      age_power=8.0),
        "every10-rotate": lk.FixedRefresh(every=10),
        "budget20-front3-aged-rotate": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps),
        # the remaining deviations from the reference undone, one at a time and all together
        "every10-no-first-update": lk.FixedRefresh(every=10),
        "every10-plain-eps": lk.FixedRefresh(every=10),
        "every10-decay-after": lk.FixedRefresh(every=10),
        "every10-reference-options": lk.FixedRefresh(every=10),
        "budget20-front3-aged-taper-no-first-update": default(),
        "every10-first-step-adam": lk.FixedRefresh(every=10),
        # where the first step's effect sits: its update alone, or the first gradient in the moments
        "every10-first-step-undone": lk.FixedRefresh(every=10),
        "every10-first-step-fresh-moments": lk.FixedRefresh(every=10),
        # ... and which of the two moments carries it: M (or V) alone restarted after the first step
        "every10-first-step-fresh-m": lk.FixedRefresh(every=10),
        "every10-first-step-fresh-v": lk.FixedRefresh(every=10),
        "budget20-front3-aged-taper-first-step-fresh-m": default(),
        "budget20-front3-aged-taper-reference-options": default(),
        # the default with the factors of size <= 8 (a convolution's 3x3 kernel dims) on the every=10 clock
        "budget20-front3-aged-taper-small8-clock": SmallFactorsOnClock(default(), max_size=8, every=10),
        # every factor of a block refreshed together, at every=20's count (2-factor blocks)
        "budget40-front3-aged-taper-whole-blocks": WholeBlocks(default(every=40)),
        "budget39-front3-aged-taper-whole-blocks": WholeBlocks(default(every=39)),
        # EShampoo (exact eigh refreshes; after the step, V by rank, per-dim conv blocks, as SOAP) on its
        # clock and at its default (the same budget as SOAP's); at AdamW's betas, its own defaults
        "eshampoo-every10": lk.FixedRefresh(every=10),
        "eshampoo-default": default(),
        "eshampoo-every10-adamw-betas": lk.FixedRefresh(every=10),
        # EShampoo's choices around a refresh before the study (inside the step, V rotated, merged dims)
        "eshampoo-every10-own-carry": lk.FixedRefresh(every=10),
        "eshampoo-default-own-carry": default(),
        "eshampoo-aged-flat-own-carry": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps),
        "eshampoo-every10-adamw-betas-own-carry": lk.FixedRefresh(every=10),
        "relative4": RelativeRefresh(ratio=4.0, floor=0.02),
        "tol0.1-check10-qr3": lk.AdaptiveRefresh(tolerance=0.1, check_every=10, max_iters=3),
        "gpt-tuned-0.15early-0.5": lk.AdaptiveRefresh(
            tolerance=0.5, schedule=lk.TighterEarly(early_tolerance=0.15, early_steps=int(0.2 * steps))),
    }


BASELINES = ("every10", "every1", "every20")
#: EShampoo's choices around a refresh before the study took SOAP's for it.
_ESHAMPOO_OWN_CARRY = {"refresh_timing": "in_step", "second_moment_on_refresh": "rotate", "merge_dims": True}
#: The reference's choices where SOAP's defaults still differ from it (docs/algorithms.md).
_REMAINING_DEVIATIONS_UNDONE = {"update_at_start": False, "bias_corrected_eps": False,
                                "weight_decay_mode": "decoupled_after_update"}
#: Schedules that also change one of SOAP's defaults around a refresh (their name says which).
SOAP_OVERRIDES = {"every10-rotate": {"second_moment_on_refresh": "rotate"},
                  "budget20-front3-aged-rotate": {"second_moment_on_refresh": "rotate"},
                  "every10-no-first-update": {"update_at_start": False},
                  "every10-plain-eps": {"bias_corrected_eps": False},
                  "every10-decay-after": {"weight_decay_mode": "decoupled_after_update"},
                  "every10-reference-options": _REMAINING_DEVIATIONS_UNDONE,
                  "budget20-front3-aged-taper-no-first-update": {"update_at_start": False},
                  "every10-first-step-adam": {"update_at_start": False},
                  **{name: _ESHAMPOO_OWN_CARRY for name in ("eshampoo-every10-own-carry", "eshampoo-default-own-carry",
                                                            "eshampoo-aged-flat-own-carry",
                                                            "eshampoo-every10-adamw-betas-own-carry")},
                  "budget20-front3-aged-taper-reference-options": _REMAINING_DEVIATIONS_UNDONE}
#: Schedules run with another optimizer than SOAP (same hyperparameters); their baseline is that
#: optimizer's every=10 (:func:`baseline_of`).
OPTIMIZER_OF = {name: "eshampoo" for name in ("eshampoo-every10", "eshampoo-default", "eshampoo-every10-adamw-betas",
                                                "eshampoo-every10-own-carry", "eshampoo-default-own-carry",
                                                "eshampoo-aged-flat-own-carry", "eshampoo-every10-adamw-betas-own-carry")}
#: Schedules run at other betas than the study's (0.95, 0.95).
BETAS_OF = {"eshampoo-every10-adamw-betas": (0.9, 0.999), "eshampoo-every10-adamw-betas-own-carry": (0.9, 0.999)}
#: The schedule that is SOAP's default (``BudgetRefresh(total_steps=...)``, as KronCallback and the
#: recipes run it).
DEFAULT = "budget20-front3-aged-taper"
#: Not a schedule of ours: the SOAP reference code (``pytorch_optimizer.SOAP``, its every=10) at the
#: study's hyperparameters, learning-rate schedule and weight-decay groups.
REFERENCE = "reference"


def baseline_of(schedule: str, baseline: str = "every10") -> str:
    """What a schedule's row is compared with: SOAP's ``baseline``, or for a run of another
    optimizer (:data:`OPTIMIZER_OF`) against SOAP's every=10, that optimizer's own every=10 (at
    the run's betas, :data:`BETAS_OF`)."""
    optimizer = OPTIMIZER_OF.get(schedule)
    if optimizer is None or baseline != "every10":
        return baseline
    if schedule in BETAS_OF:  # the same optimizer on the clock at the same betas
        return next(name for name, betas in BETAS_OF.items() if betas == BETAS_OF[schedule]
                    and OPTIMIZER_OF.get(name) == optimizer and name not in SOAP_OVERRIDES)
    return f"{optimizer}-every10"
