"""CTAs and warps resident per SM, by the standard occupancy rules (CUDA occupancy calculator).

Per SM (sm_90 / sm_80): 65,536 32-bit registers; 228 / 164 KB of shared memory (the largest
carveout), of which the runtime reserves 1 KB per CTA, at most 227 / 163 KB for one CTA; at most
32 CTAs and 64 warps. Registers are allocated per warp in units of 256: a thread's count rounded
up to a multiple of 8, times 32 lanes. Shared memory is allocated in units of 128 bytes.

    CTAs per SM = min(registers: floor(floor(65536 / regs_per_warp) / warps per CTA),
                      shared:    floor(SM shared / (CTA shared rounded to 128 B + 1 KB)),
                      warps:     floor(64 / warps per CTA),
                      CTAs:      32)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class SMLimits:
    registers: int = 65536
    register_unit: int = 256       # registers per warp come in units of 256 (8 per thread)
    shared: int = 228 * 1024       # per SM, the largest carveout
    shared_per_cta: int = 227 * 1024
    shared_reserved: int = 1024    # per CTA, taken by the runtime
    shared_unit: int = 128
    max_ctas: int = 32
    max_warps: int = 64


LIMITS = {90: SMLimits(), 80: SMLimits(shared=164 * 1024, shared_per_cta=163 * 1024)}


def occupancy(regs: Optional[int], num_warps: int, shared: int, cc: int = 90) -> Dict[str, object]:
    """{"ctas_per_sm", "warps_per_sm", "limit" (the binding limit(s), e.g. "registers" or
    "registers=warps"; "does not fit" when a CTA exceeds the SM), "limits": per limit, the CTAs it
    allows}. regs None (no ptxas report): registers are left out of the minimum."""
    lim = LIMITS[cc]
    limits: Dict[str, int] = {}
    if regs is not None:
        per_warp = math.ceil(max(regs, 1) * 32 / lim.register_unit) * lim.register_unit
        limits["registers"] = (lim.registers // per_warp) // num_warps
    cta_shared = math.ceil(shared / lim.shared_unit) * lim.shared_unit + lim.shared_reserved
    limits["shared"] = 0 if shared > lim.shared_per_cta else lim.shared // cta_shared
    limits["warps"] = lim.max_warps // num_warps
    limits["CTAs"] = lim.max_ctas
    ctas = min(limits.values())
    binding = "does not fit" if ctas == 0 else "=".join(k for k, v in limits.items() if v == ctas)
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps, "limit": binding, "limits": limits}


def waves(grid_ctas: int, ctas_per_sm: int, sm_count: int) -> int:
    """ceil(grid / (CTAs per SM x SM count)); 0 when no CTA fits."""
    if ctas_per_sm <= 0:
        return 0
    return math.ceil(grid_ctas / (ctas_per_sm * sm_count))


__all__ = ["occupancy", "waves", "LIMITS", "SMLimits"]
