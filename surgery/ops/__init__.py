"""Operations, one per command: extract, merge, refine, init, factorize, bottleneck, analyze, inspect, the demo pipeline."""
