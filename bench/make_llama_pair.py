"""Generate a deterministic Llama-architecture base/fine-tune pair (and a LoRA adapter) on disk.

Default shape: hidden 2048, intermediate 5632, 8 layers, 32 heads, 4 kv heads,
vocab 32000, bf16, untied lm_head: 0.49B parameters (~0.98 GB per model).
Tensors are generated directly with torch (one at a time, seeded per tensor name),
never through a transformers model, so memory stays at ~one shard.

The fine-tune is base + a realistic delta on every tensor:
  2-D weights: a low-rank part (rank --delta-rank, geometrically decaying spectrum,
               ‖·‖ = --lowrank-frac · ‖W‖) plus dense Gaussian noise (‖·‖ = --noise-frac · ‖W‖);
  norms:       N(0, --norm-delta) added to the weights.

Outputs (under --out):
  base/  ft/      HF model directories: config.json, model-0000i-of-0000N.safetensors,
                  model.safetensors.index.json
  lora-r16/       (with --lora) a PEFT LoRA adapter for base/: all linear layers, r=16,
                  lora_alpha=32, lora_B non-zero (‖s·B·A‖ ≈ --lowrank-frac · ‖W‖)

Usage:
  python bench/make_llama_pair.py --out bench/work/llama            # 8 layers, base + ft
  python bench/make_llama_pair.py --out bench/work/llama --lora     # + lora-r16/
  python bench/make_llama_pair.py --out bench/work/llama32 --layers 32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def tensor_specs(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int):
    """(name, shape) in the order HF writes a Llama checkpoint."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def gen(name: str, tag: str, seed: int) -> torch.Generator:
    """A generator seeded by (seed, tag, tensor name): reproducible whatever the order."""
    h = hashlib.sha256(f"{seed}/{tag}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def base_tensor(name: str, shape, seed: int) -> torch.Tensor:
    g = gen(name, "base", seed)
    if len(shape) == 1:  # RMSNorm weights: around 1, not exactly 1, like a trained model
        return 1.0 + 0.05 * torch.randn(shape, generator=g)  # (d,)
    return 0.02 * torch.randn(shape, generator=g)  # (out, in)


def delta_tensor(name: str, w: torch.Tensor, seed: int, rank: int, lowrank_frac: float,
                 noise_frac: float, norm_delta: float) -> torch.Tensor:
    g = gen(name, "delta", seed)
    if w.dim() == 1:
        return norm_delta * torch.randn(w.shape, generator=g)  # (d,)
    out, inp = w.shape
    rank = min(rank, out, inp)  # tiny tensors (e.g. token-type embeddings, 2 rows)
    wn = w.norm()
    # low-rank part with a decaying spectrum, like a real fine-tune's top directions
    u, _ = torch.linalg.qr(torch.randn(out, rank, generator=g))  # (out, r)
    v, _ = torch.linalg.qr(torch.randn(inp, rank, generator=g))  # (in, r)
    s = 0.75 ** torch.arange(rank, dtype=torch.float32)  # (r,)
    s = s * (lowrank_frac * wn / s.norm())
    low = (u * s) @ v.T  # (out, in)
    noise = torch.randn(out, inp, generator=g)  # (out, in)
    noise *= noise_frac * wn / noise.norm()
    return low + noise


def lora_tensors(module: str, out: int, inp: int, r: int, alpha: float, frac: float,
                 seed: int, dtype: torch.dtype):
    """PEFT-style lora_A (r, in), lora_B (out, r), with ‖(alpha/r)·B·A‖ = frac · ‖W‖ (W ~ 0.02)."""
    g = gen(module, "lora", seed)
    a = torch.randn(r, inp, generator=g) / math.sqrt(inp)  # (r, in)
    b = torch.randn(out, r, generator=g)  # (out, r)
    scale = alpha / r
    target = frac * 0.02 * math.sqrt(out * inp)
    b *= target / (scale * (b @ a).norm())
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def plan_shards(specs, nbytes_per_el: int, max_shard: int):
    shards, cur, cur_bytes = [], [], 0
    for name, shape in specs:
        nb = math.prod(shape) * nbytes_per_el
        if cur and cur_bytes + nb > max_shard:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nb
    if cur:
        shards.append(cur)
    return shards


def write_config(d: Path, args) -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
    )
    cfg.to_json_file(d / "config.json")
    # older transformers (mergekit's venv) read torch_dtype / rope_theta
    obj = json.loads((d / "config.json").read_text())
    obj.setdefault("torch_dtype", "bfloat16")
    obj.setdefault("rope_theta", 10000.0)
    obj["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(obj, indent=2) + "\n")


def make_pair(args) -> None:
    out = Path(args.out)
    specs = tensor_specs(args.hidden, args.intermediate, args.layers, args.heads,
                         args.kv_heads, args.vocab)
    shapes = dict(specs)
    shards = plan_shards(specs, 2, parse_size(args.max_shard_size))
    n = len(shards)
    dirs = {"base": out / "base"} | ({} if args.no_ft else {"ft": out / "ft"})
    for d in dirs.values():
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        write_config(d, args)
    weight_map: dict[str, str] = {}
    total = 0
    for si, names in enumerate(shards, 1):
        fname = f"model-{si:05d}-of-{n:05d}.safetensors"
        base_sd, ft_sd = {}, {}
        for name in names:
            w = base_tensor(name, shapes[name], args.seed)  # fp32
            base_sd[name] = w.to(torch.bfloat16)
            if not args.no_ft:
                d = delta_tensor(name, w, args.seed, args.delta_rank, args.lowrank_frac,
                                 args.noise_frac, args.norm_delta)
                ft_sd[name] = (w + d).to(torch.bfloat16)
                del d
            weight_map[name] = fname
            total += w.numel()
            del w
        save_file(base_sd, str(dirs["base"] / fname), metadata={"format": "pt"})
        if not args.no_ft:
            save_file(ft_sd, str(dirs["ft"] / fname), metadata={"format": "pt"})
        print(f"shard {si}/{n} written", flush=True)
        del base_sd, ft_sd
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    for d in dirs.values():
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"{total / 1e9:.3f}B parameters per model -> {', '.join(map(str, dirs.values()))}")


def make_lora(args) -> None:
    d = Path(args.out) / f"lora-r{args.lora_rank}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    specs = tensor_specs(args.hidden, args.intermediate, args.layers, args.heads,
                         args.kv_heads, args.vocab)
    sd = {}
    for name, shape in specs:
        mod = name[: -len(".weight")]
        if mod.rsplit(".", 1)[-1] not in LINEAR:
            continue
        a, b = lora_tensors(mod, shape[0], shape[1], args.lora_rank, args.lora_alpha,
                            args.lowrank_frac, args.seed, torch.bfloat16)
        sd[f"base_model.model.{mod}.lora_A.weight"] = a
        sd[f"base_model.model.{mod}.lora_B.weight"] = b
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA", "task_type": None, "r": args.lora_rank,
        "lora_alpha": args.lora_alpha, "target_modules": list(LINEAR),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "lora_bias": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
        "base_model_name_or_path": str((Path(args.out) / "base").resolve()),
        "inference_mode": True,
    }
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"LoRA adapter r={args.lora_rank}: {len(sd)} tensors -> {d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (base/, ft/, lora-r16/)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-shard-size", default="500MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta-rank", type=int, default=12, help="rank of the low-rank part of Δ")
    p.add_argument("--lowrank-frac", type=float, default=0.03, help="‖low-rank Δ‖ / ‖W‖")
    p.add_argument("--noise-frac", type=float, default=0.01, help="‖dense noise Δ‖ / ‖W‖")
    p.add_argument("--norm-delta", type=float, default=0.01, help="std of the norm-weight Δ")
    p.add_argument("--no-ft", action="store_true", help="write base/ only")
    p.add_argument("--no-pair", action="store_true", help="skip base/ft (e.g. only --lora)")
    p.add_argument("--lora", action="store_true", help="also write a PEFT LoRA adapter for base/")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    if not args.no_pair:
        make_pair(args)
    if args.lora:
        make_lora(args)
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
