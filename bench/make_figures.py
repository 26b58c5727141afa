"""Draw the README's figures from the fixtures, one per plotting command, into docs/img/.

    python bench/make_figures.py            # docs/img/{analyze,extract-lora,refine}.png

Runs the same library calls as `surgery analyze --plot`, `surgery extract-lora --plot` and
`surgery refine --plot` on fixtures/ (CPU, under a minute), so the pictures stay true to the code.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.make_fixtures import WORDS  # noqa: E402
from surgery.ops.analyze import analyze  # noqa: E402
from surgery.ops.extract import extract_lora  # noqa: E402
from surgery.ops.refine import refine_adapter  # noqa: E402
from surgery.report import plots  # noqa: E402

FIX = Path("fixtures")  # relative (run from the repository root): the figures' titles name no machine path


def main(out_dir: Path = Path("docs") / "img") -> list[Path]:
    os.chdir(ROOT)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    res = analyze(FIX / "tiny-llama-ft", FIX / "tiny-llama", ranks=[2, 4, 8], 
                  include=[r"layers\.\d+\.(self_attn\.q_proj|mlp\.down_proj)"])
    written.append(plots.plot_spectra(res, out_dir / "analyze.png", overwrite=True))
    with tempfile.TemporaryDirectory() as tmp:
        ex = extract_lora(FIX / "tiny-llama", FIX / "tiny-llama-ft", Path(tmp) / "lora", rank=4)
        ex.out = Path("lora")
        written.append(plots.plot_extract(ex, out_dir / "extract-lora.png", overwrite=True))
        rnd = random.Random(1)
        calib = Path(tmp) / "calib.txt"
        calib.write_text("\n".join(" ".join(rnd.choice(WORDS[5:90]) for _ in range(rnd.randint(4, 14)))
                                   for _ in range(160)) + "\n")
        svd = extract_lora(FIX / "tiny-bert", FIX / "tiny-bert-ft", Path(tmp) / "svd", rank=2, bias="lora").out
        ref = refine_adapter(FIX / "tiny-bert", svd, Path(tmp) / "refined", teacher=FIX / "tiny-bert-ft",
                             calibration=calib, steps=120, lr=5e-3, batch_size=8, eval_every=10, seed=0)
        ref.out = Path("lora-refined")
        written.append(plots.plot_refine(ref, out_dir / "refine.png", overwrite=True))
    return written


if __name__ == "__main__":
    for p in main():
        print(f"wrote {p} ({p.stat().st_size // 1024} KB)")
