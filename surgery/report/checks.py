"""Quality warnings a result raises about itself, and grouped notes.

Every function here is pure (numbers and strings in, strings out) and never names a CLI flag:
an option field is written in backquotes (`max_rank`), which the CLI turns into its flag.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: factorize: below this mean cosine of the last hidden state, the output is called poor
MIN_OUTPUT_COSINE = 0.99

#: relative machine epsilon (2 ulps of 1.0 ... one ulp spacing) of the dtypes a checkpoint stores
DTYPE_EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-23, "float64": 2.0**-52}


def dedupe(lines: Iterable[str]) -> list[str]:
    """The lines in their first order, each once.

    Example:
        >>> dedupe(["a", "b", "a"])
        ['a', 'b']
    """
    seen: dict[str, None] = {}
    for line in lines:
        seen.setdefault(line, None)
    return list(seen)


def output_cosine_warning(check: dict | None, policy: str) -> str | None:
    """A warning when a factorised model's outputs drift from the original's.

    Args:
        check: factorize's output_check dict ({"cosine_mean", "cosine_min", ...}), or None / {"skipped": ...}.
        policy: the rank policy in force, e.g. "energy 0.7" or "rank 4", to say what to raise.

    Returns:
        The warning text, or None when the mean cosine is at least MIN_OUTPUT_COSINE (or unchecked).

    Example:
        >>> output_cosine_warning({"cosine_mean": 0.56, "cosine_min": 0.2}, "energy 0.7")[:40]
        "the factorised model's last hidden state"
    """
    if not check or "cosine_mean" not in check or check["cosine_mean"] >= MIN_OUTPUT_COSINE:
        return None
    return (f"the factorised model's last hidden state has a mean cosine of {check['cosine_mean']:.3f} "
            f"(min {check['cosine_min']:.3f}) to the original's, below {MIN_OUTPUT_COSINE}: it is not a faithful "
            f"copy at {policy}; raise `energy` or `rank`, or factorise fewer layers (`include` / `min_savings`)")


def capped_energy_warning(kept: Sequence[tuple[str, int, float]], energy: float | None, cap: int | None,
                          what: str = "modules") -> str | None:
    """A warning when an energy target is not reached because of the rank cap.

    Args:
        kept: (module, rank, energy kept) of every decomposed module.
        energy: the energy target (None: no energy policy, no warning).
        cap: the rank cap in force (None: no cap).
        what: the noun for the rows ("modules", "layers").

    Returns:
        "N of M modules stopped at `max_rank` R below energy E ..." or None.

    Example:
        >>> capped_energy_warning([("a", 4, 0.8), ("b", 2, 0.95)], 0.9, 4)[:36]
        '1 of 2 modules stopped at `max_rank`'
    """
    if energy is None or cap is None or not kept:
        return None
    short = [(m, k) for m, r, k in kept if r >= cap and k < energy - 1e-9]
    if not short:
        return None
    worst = min(short, key=lambda t: t[1])
    return (f"{len(short)} of {len(kept)} {what} stopped at `max_rank` {cap} below the energy target {energy:g} "
            f"(lowest: {worst[0]} keeps {100 * worst[1]:.1f}%); raise `max_rank` to reach it")


def rounding_delta_warning(rel_changes: Sequence[tuple[str, float]], base_dtype: str, ft_dtype: str) -> str | None:
    """A warning when the delta between two checkpoints stored in different dtypes is mostly rounding.

    A bf16 fine-tune against an fp32 base differs everywhere by the bf16 rounding of the base
    (‖Δ‖/‖W‖ about 2^-9); modules whose relative change is within one epsilon (2 ulps at 1.0) of
    the coarser dtype are counted as rounding.

    Args:
        rel_changes: (module, ‖Δ‖_F / ‖W‖_F) of every module compared.
        base_dtype, ft_dtype: the dtypes the two checkpoints store ("float32", "bfloat16", ...).

    Returns:
        The warning, or None when the dtypes agree or most of the delta is above the rounding level.

    Example:
        >>> rounding_delta_warning([("a", 0.002), ("b", 0.003)], "float32", "bfloat16")[:18]
        '2 of 2 modules dif'
    """
    if base_dtype == ft_dtype or not rel_changes:
        return None
    eps = max(DTYPE_EPS.get(base_dtype, 0.0), DTYPE_EPS.get(ft_dtype, 0.0))
    noise = [m for m, rc in rel_changes if 0 < rc <= eps]
    if not eps or 2 * len(noise) <= len(rel_changes):
        return None
    coarse = base_dtype if DTYPE_EPS.get(base_dtype, 0) >= DTYPE_EPS.get(ft_dtype, 0) else ft_dtype
    return (f"{len(noise)} of {len(rel_changes)} modules differ by no more than {coarse} rounding "
            f"(|d|/|W| <= {eps:.2g}; BASE is {base_dtype}, FT {ft_dtype}): that 'delta' is mostly rounding noise, "
            f"e.g. {noise[0]}; compare the two in the same dtype (cast BASE to {coarse} first)")


def group_skips(skipped: Sequence[dict], limit: int = 3) -> list[str]:
    """Skipped deltas grouped by reason: one line per reason, with the count and the delta share.

    Args:
        skipped: rows with "tensor", "why" and optionally "share" (of ‖Δ‖²).
        limit: reasons shared by at most this many tensors are listed by name.

    Returns:
        Lines such as "37 bias deltas skipped (0.4 % of the delta): why; e.g. a, b".

    Example:
        >>> group_skips([{"tensor": f"l{i}.bias", "why": "bias=skip", "share": 0.001} for i in range(5)])
        ['5 bias deltas skipped (0.50 % of the delta): bias=skip; e.g. l0.bias, l1.bias']
    """
    groups: dict[str, list[dict]] = {}
    for s in skipped:
        groups.setdefault(str(s.get("why", "")), []).append(s)
    lines = []
    for why, rows in groups.items():
        share = sum(r.get("share") or 0.0 for r in rows)
        pct = f" ({100 * share:.2f} % of the delta)" if share else ""
        if len(rows) <= limit:
            lines += [f"skipped {r['tensor']}: {why}" + (f" ({100 * r['share']:.2f} % of the delta)"
                                                         if r.get("share") else "") for r in rows]
            continue
        noun = "bias deltas" if all(str(r["tensor"]).endswith("bias") for r in rows) else "deltas"
        lines.append(f"{len(rows)} {noun} skipped{pct}: {why}; e.g. {rows[0]['tensor']}, {rows[1]['tensor']}")
    return lines
