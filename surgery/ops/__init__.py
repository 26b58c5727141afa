"""Operations, one per command: extract, merge, refine, init-lora, factorize, bottleneck adapters,
analyze, inspect, and the demo pipeline."""
