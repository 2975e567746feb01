"""What the tests of whole runs share: the tiny lengths, a silent log, and a small run's config."""

LEN = dict(max_length=64, max_prompt_length=32)
QUIET = dict(log=lambda *a: None)


def run_config(tiny, cache, out, method="simpo", **kw) -> dict:
    """The keys of a two-step run on the tiny model in `out`: a cache and the SAE for the methods that need them
    (every method, with protect)."""
    needs = method in ("fpo", "dpo") or kw.get("protect") is not None
    base = dict(
        method=method,
        model=tiny["model"],
        dataset=tiny["pairs"],
        cache=cache if needs else None,
        sae=tiny["sae"] if method == "fpo" or kw.get("protect") is not None else None,
        batch_size=4,
        micro_batch_size=2,
        max_steps=2,
        lr=1e-3,
        warmup_steps=0,
        k=16,
        output_dir=str(out),
        log_every=1,
        progress=False,
        **LEN,
    )
    base.update(kw)
    return base
