"""What users look at: figures, tables, warnings, model cards, inspect's descriptions (surgery.report)."""

from __future__ import annotations

import json
import random
import shutil
from itertools import combinations
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fixtures.make_fixtures import WORDS
from surgery.cli.main import cli
from surgery.ops.analyze import analyze
from surgery.ops.extract import extract_lora
from surgery.ops.factorize import factorize
from surgery.ops.inspect import inspect_checkpoint
from surgery.ops.refine import EvalPoint, RefineResult
from surgery.report import cards, checks, plots

matplotlib = pytest.importorskip("matplotlib")


# ----------------------------------------------------------------------------- figure checks


def _title_boxes(fig):
    """Window boxes of the suptitle and every axes title that has text (rendered)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        for t in (ax.title, ax._left_title, ax._right_title):
            if t.get_text():
                texts.append(t)
    return [(t.get_text(), t.get_window_extent(r)) for t in texts]


def assert_readable(fig, legends: bool = True):
    """Every data axes labelled (and with a legend), no two titles overlapping, a suptitle."""
    assert fig._suptitle is not None and fig._suptitle.get_text()
    data_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.axison]
    assert data_axes
    for ax in data_axes:
        # an x label on the axes, or on the axes it shares x with (stacked heatmaps label the bottom one)
        assert ax.get_xlabel() or any(o.get_xlabel() for o in ax.get_shared_x_axes().get_siblings(ax)), ax
        assert ax.get_ylabel(), ax
        assert ax.get_title(), ax
        if legends:
            assert ax.get_legend() is not None, ax.get_title()
        assert ax.has_data() or ax.images, f"empty panel {ax.get_title()}"
    boxes = _title_boxes(fig)
    for (ta, a), (tb, b) in combinations(boxes, 2):
        assert not a.overlaps(b), f"titles overlap: {ta!r} / {tb!r}"


def assert_png(path: Path):
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 5_000_000


# ----------------------------------------------------------------------------- 1. plots


def test_analyze_figure_readable(tiny_bert, tiny_bert_ft, tmp_path):
    res = analyze(tiny_bert_ft, tiny_bert, ranks=[2, 4, 8])
    fig = plots.spectra_figure(res)
    assert_readable(fig)
    ax_e = fig.axes[1]  # energy panel: markers at the requested ranks
    marks = [ln for ln in ax_e.lines if ln.get_linestyle() == "None" and len(ln.get_xdata())]
    assert marks and sorted(set(marks[0].get_xdata())) == [2, 4, 8]
    assert fig.axes[0].get_yscale() == "log"  # singular values span decades
    for ax in fig.axes:  # integer ticks only (no 1.2 / 1.4 on a 2-row matrix)
        if ax.get_xscale() == "linear":
            assert all(float(t).is_integer() for t in ax.get_xticks())
    matplotlib.pyplot.close(fig)
    r = CliRunner().invoke(cli, ["analyze", str(tiny_bert_ft), "--base", str(tiny_bert), "--plot",
                                 str(tmp_path / "a.png"), "-q"])
    assert r.exit_code == 0, r.output
    assert_png(tmp_path / "a.png")


def test_analyze_figure_zero_delta_not_drawn(tiny_bert, tmp_path):
    """Negative control: a model against itself has a zero delta everywhere: no empty panels,
    one axes saying so."""
    res = analyze(tiny_bert, tiny_bert, ranks=[2])
    fig = plots.spectra_figure(res)
    assert "not drawn" in fig._suptitle.get_text()
    assert all(not ax.axison for ax in fig.axes)
    assert any("zero" in t.get_text() for ax in fig.axes for t in ax.texts)
    matplotlib.pyplot.close(fig)


def test_extract_plot(tiny_llama, tiny_llama_ft, tmp_path):
    r = CliRunner().invoke(cli, ["extract-lora", str(tiny_llama), str(tiny_llama_ft), "-o", str(tmp_path / "l"),
                                 "--rank", "2", "--plot", str(tmp_path / "e.png"), "-q"])
    assert r.exit_code == 0, r.output
    assert_png(tmp_path / "e.png")
    res = extract_lora(tiny_llama, tiny_llama_ft, tmp_path / "l2", rank=2)
    fig = plots.extract_figure(res)
    assert_readable(fig, legends=False)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 and all(b.get_ylabel() for b in bars)
    heat = [ax for ax in fig.axes if ax.images]
    assert {t.get_text() for t in heat[0].get_yticklabels()} >= {"layer 0", "layer 1"}
    matplotlib.pyplot.close(fig)


def test_plot_refused_into_input_or_bad_suffix(tiny_bert, tiny_bert_ft, tmp_path):
    r = CliRunner().invoke(cli, ["extract-lora", str(tiny_bert), str(tiny_bert_ft), "-o", str(tmp_path / "l"),
                                 "--rank", "2", "--plot", str(tmp_path / "e.gif")])
    assert r.exit_code == 2 and "--plot" in r.output and not (tmp_path / "l").exists()
    r = CliRunner().invoke(cli, ["extract-lora", str(tiny_bert), str(tiny_bert_ft), "-o", str(tmp_path / "l"),
                                 "--rank", "2", "--plot", str(Path(tiny_bert) / "x.png")])
    assert r.exit_code != 0 and not (Path(tiny_bert) / "x.png").exists() and not (tmp_path / "l").exists()


def _refine_result(out="out", steps=40) -> RefineResult:
    losses = [0.5, 0.2, 0.05, 0.01, 0.012]
    curve = [EvalPoint(10 * i, v, 1 - v, None, v * 3) for i, v in enumerate(losses)]
    return RefineResult(out=Path(out), objective="pooled", steps=steps, best_step=30, train_samples=80,
                        holdout_samples=20, trainable_params=1000, no_adapter=EvalPoint(0, 1.0, 0.0, None, 2.0),
                        before=curve[0], after=curve[3], curve=curve,
                        train_loss=[(10, 0.3), (20, 0.1), (30, 0.02), (40, 0.01)], steps_run=40,
                        options={"patience": 1})


def test_refine_figure(tmp_path):
    fig = plots.refine_figure(_refine_result())
    assert_readable(fig)
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert any("best" in t and "30" in t for t in labels) and any("train" in t for t in labels)
    assert fig.axes[0].get_yscale() == "log"  # the loss spans two decades
    plots.save_figure(fig, tmp_path / "r.png")
    assert_png(tmp_path / "r.png")


def test_refine_figure_marks_early_stop():
    """Stopped by patience at step 40 of 100: both panels mark step 40; a run of all its steps marks none."""
    def stop_lines(fig):
        return [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label().startswith("early stop")]

    fig = plots.refine_figure(_refine_result(steps=100))
    lines = stop_lines(fig)
    assert len(lines) == 2 and all(list(ln.get_xdata()) == [40, 40] for ln in lines)
    assert lines[0].get_label() == "early stop: step 40 of 100, patience 1"
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert labels.count("early stop: step 40 of 100, patience 1") == 2
    matplotlib.pyplot.close(fig)
    fig = plots.refine_figure(_refine_result(steps=40))  # negative control: every step ran
    assert stop_lines(fig) == []
    matplotlib.pyplot.close(fig)


def test_refine_cli_plot(tiny_bert, tiny_bert_ft, tmp_path):
    rnd = random.Random(3)
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(" ".join(rnd.choice(WORDS[5:90]) for _ in range(8)) for _ in range(40)) + "\n")
    extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "svd", rank=2)
    r = CliRunner().invoke(cli, ["refine", str(tiny_bert), str(tmp_path / "svd"), "--teacher", str(tiny_bert_ft),
                                 "--calibration", str(calib), "-o", str(tmp_path / "ref"), "--steps", "6",
                                 "--plot", str(tmp_path / "r.png"), "-q"])
    assert r.exit_code == 0, r.output
    assert_png(tmp_path / "r.png")


# ----------------------------------------------------------------------------- 2. tables and notes


def test_group_skips_and_dedupe():
    skipped = [{"tensor": f"layer.{i}.bias", "why": "bias='skip'", "share": 0.0001} for i in range(37)]
    lines = checks.group_skips(skipped + [{"tensor": "x.weight", "why": "other"}])
    assert lines[0].startswith("37 bias deltas skipped (0.37 % of the delta)")
    assert lines[1] == "skipped x.weight: other" and len(lines) == 2
    assert checks.dedupe(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


def test_extract_table_headers_and_summary(tiny_bert, tiny_bert_ft, tmp_path):
    from surgery.cli.commands.extract_cmd import render_extract

    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "l", rank=2, bias="skip")
    res.notes += [res.notes[0]] * 2 if res.notes else ["same note", "same note"]
    text = render_extract(res, top=5)
    assert "energy kept (%)" in text and "E@" not in text and "rel. error" in text
    assert "(a summary: 5 of 16 modules shown, worst relative error first; all of them in --report FILE / --json)" \
        in text
    assert sum(ln.endswith("bias='skip'") or "bias deltas skipped" in ln for ln in text.splitlines()) == 1
    notes = [ln for ln in text.splitlines() if ln.startswith("note:")]
    assert len(notes) == len(set(notes))
    full = render_extract(res, top=None)  # everything: no summary line
    assert "a summary" not in full


def test_refine_table_kl_scientific_and_status_column():
    from surgery.cli.commands.refine_cmd import render_refine

    res = _refine_result()
    res.objective = "logits-kl"
    for p in [res.no_adapter, *res.curve]:
        p.kl = 3e-7
    text = render_refine(res)
    head = text.splitlines()[0]
    assert "checkpoint" in head and "KL (nats/token)" in head
    assert "3.000e-07" in text and "0.000000" not in text
    assert "best: saved" in text


def test_analyze_table_headers(tiny_bert, tiny_bert_ft):
    from surgery.cli.commands.analyze_cmd import render_analyze

    text = render_analyze(analyze(tiny_bert_ft, tiny_bert, ranks=[2, 8]))
    assert "d kept r=8 (%)" in text and "dE@" not in text and "r for 90%" in text
    svd = [ln for ln in text.splitlines() if "SVD" in ln]  # one line, not a 3-line footnote on every run
    assert len(svd) == 1 and "power iterations" not in text


# ----------------------------------------------------------------------------- 3. warnings


def test_capped_energy_warning_cli(tiny_bert, tiny_bert_ft, tmp_path):
    r = CliRunner().invoke(cli, ["extract-lora", str(tiny_bert), str(tiny_bert_ft), "-o", str(tmp_path / "l"),
                                 "--energy", "0.9", "--max-rank", "3", "--bias", "skip"])
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.output.splitlines() if "stopped at --max-rank 3" in ln]
    assert len(warn) == 1 and warn[0].startswith("warning: ") and "of 16 modules" in warn[0]
    # negative control: a cap high enough reaches every target, no warning
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "l2", energy=0.9, max_rank=32, bias="skip")
    assert not any("max_rank" in w for w in res.warnings)


def test_factorize_cosine_warning(tiny_llama, tmp_path):
    res = factorize(tiny_llama, tmp_path / "f", energy=0.1)
    assert res.output_check["cosine_mean"] < 0.99
    assert any("cosine" in w and "`energy`" in w for w in res.warnings)
    r = CliRunner().invoke(cli, ["factorize", str(tiny_llama), "-o", str(tmp_path / "g"), "--energy", "0.1", "-q"])
    assert r.exit_code == 0 and "warning: " in r.output and "--energy" in r.output
    good = factorize(Path(tiny_llama).parent / "tiny-bert", tmp_path / "h", rank=8)  # negative control
    assert good.output_check["cosine_mean"] >= 0.99 and not good.warnings


def _bf16_copy(src: Path, dst: Path, noise: float = 0.0) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    out = {k: (v + noise * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.ndim == 2
               else v).to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_rounding_delta_warning(tiny_bert, tmp_path):
    ft = _bf16_copy(Path(tiny_bert), tmp_path / "bf16")
    res = extract_lora(tiny_bert, ft, tmp_path / "l", rank=2, bias="skip")
    w = [x for x in res.warnings if "rounding" in x]
    assert len(w) == 1 and "bfloat16" in w[0] and "same dtype" in w[0]
    # negative control: a real fine-tune (a delta well above bf16 rounding) stored in bf16
    ft2 = _bf16_copy(Path(tiny_bert), tmp_path / "bf16-ft", noise=0.05)
    res2 = extract_lora(tiny_bert, ft2, tmp_path / "l2", rank=2, bias="skip")
    assert not any("rounding" in x for x in res2.warnings)


def test_rounding_warning_unit():
    assert checks.rounding_delta_warning([("a", 0.002)], "float32", "float32") is None
    assert checks.rounding_delta_warning([("a", 0.002)], "float32", "bfloat16") is not None
    assert checks.rounding_delta_warning([("a", 0.05), ("b", 0.002)], "float32", "bfloat16") is None


# ----------------------------------------------------------------------------- 4. model cards


def _header(card: Path) -> str:
    text = card.read_text()
    assert text.startswith("---\n")
    return text.split("\n---\n", 1)[0]


def test_cards_in_outputs(tiny_bert, tiny_bert_ft, tmp_path):
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "l", rank=2)
    head = _header(tmp_path / "l" / "README.md")
    assert 'library_name: "peft"' in head and '- "surgery"' in head
    body = (tmp_path / "l" / "README.md").read_text()
    assert "| rank | 2 |" in body and f"{round(res.overall_rel_error, 6)}" in body
    assert not (Path(tiny_bert) / "README.md").exists() or "surgery" not in (Path(tiny_bert) / "README.md").read_text()
    r = CliRunner().invoke(cli, ["init-lora", str(tiny_bert), "-o", str(tmp_path / "i"), "--rank", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert 'library_name: "peft"' in _header(tmp_path / "i" / "README.md")
    factorize(tiny_bert, tmp_path / "f", rank=4)
    head = _header(tmp_path / "f" / "README.md")
    assert 'library_name: "transformers"' in head and "output cosine" in (tmp_path / "f" / "README.md").read_text()


def test_card_hub_base_and_never_into_input(tmp_path):
    text = cards.render_card("merge", "org/model", {"a": 1}, {"b": 2})
    assert 'base_model: "org/model"' in text and 'library_name: "transformers"' in text
    local = cards.render_card("merge", str(tmp_path), {}, {})
    assert "base_model:" not in local  # a local path is not a Hub id
    inp = tmp_path / "in"
    inp.mkdir()
    from surgery.errors import OutputError

    with pytest.raises(OutputError, match="inside the input"):
        cards.write_card(inp, "merge", None, {}, {}, inputs=[inp])
    assert not (inp / "README.md").exists()
    cards.write_card(tmp_path, "merge", "org/model", {}, {})
    assert cards.read_card_kind(tmp_path) == "merge"
    assert not list(tmp_path.glob(".README*"))


# ----------------------------------------------------------------------------- 5. inspect


def test_inspect_recognises_outputs(tiny_bert, tiny_bert_ft, tmp_path):
    extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "l", rank=2)
    info = inspect_checkpoint(tmp_path / "l")
    assert info.what.startswith("PEFT LORA adapter: task FEATURE_EXTRACTION, r 2")
    CliRunner().invoke(cli, ["init-lora", str(tiny_bert), "-o", str(tmp_path / "i"), "--rank", "2", "-q"])
    info = inspect_checkpoint(tmp_path / "i")
    assert info.kind == "init-lora" and "adapter/" in info.what and info.details["rank"] == 2
    factorize(tiny_bert, tmp_path / "f", rank=4, evaluate=False)
    assert inspect_checkpoint(tmp_path / "f").what.startswith("factorize output: 13 Linear layers")
    onnx = tmp_path / "o"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"\0" * 10)
    (onnx / "manifest.json").write_text(json.dumps({"status": "ok", "task": "feature-extraction", "dtype": "fp16",
                                                    "validation": {"execution_provider": "CPUExecutionProvider"}}))
    info = inspect_checkpoint(onnx)
    assert info.kind == "onnx-export" and info.details["dtype"] == "fp16" and "CPUExecutionProvider" in info.what
    r = CliRunner().invoke(cli, ["inspect", str(onnx)])
    assert r.exit_code == 0 and "status: ok" in r.output and "what: ONNX export" in r.output
    assert inspect_checkpoint(tiny_bert).what == "model checkpoint"  # negative control


def test_inspect_bottleneck(tiny_bert, tiny_bert_ft, tmp_path):
    from surgery.ops.bottleneck import init_adapter

    init_adapter(tiny_bert, tmp_path / "b", bottleneck=2)
    info = inspect_checkpoint(tmp_path / "b")
    assert "bottleneck adapter" in info.what


def test_every_output_directory_carries_a_model_card(tmp_path):
    """merge, refine and export-onnx (both variants) write README.md with the Hub's YAML header;
    inspect says what each directory is. Control: the base fixture's own directory has no card."""
    from surgery import export_onnx, extract_lora, merge, refine_adapter
    from surgery.report.cards import read_card_kind

    fx = Path(__file__).resolve().parents[1] / "fixtures"
    assert read_card_kind(fx / "tiny-bert") is None
    extract_lora(fx / "tiny-bert", fx / "tiny-bert-ft", tmp_path / "lora", rank=2)
    merge(fx / "tiny-bert", [tmp_path / "lora"], tmp_path / "merged")
    calib = tuple(f"the model layer weight rank matrix tensor {i} one two" for i in range(16))
    refine_adapter(fx / "tiny-bert", tmp_path / "lora", tmp_path / "refined", teacher=fx / "tiny-bert-ft",
                   calibration=calib, steps=2, device="cpu")
    export_onnx(tmp_path / "merged", tmp_path / "onnx", device="cpu")
    export_onnx(fx / "tiny-llama", tmp_path / "gen", device="cpu")
    for d, kind in [("lora", "extract-lora"), ("merged", "merge"), ("refined", "refine"), ("onnx", "export-onnx"),
                    ("gen", "export-onnx")]:
        card = (tmp_path / d / "README.md").read_text()
        assert card.startswith("---\n") and "surgery" in card, d
        assert read_card_kind(tmp_path / d) == kind, d
