"""ONNX export and its checks. Importing this package imports nothing heavy and sets nothing.

    spec.py       the shared vocabulary: InputSpec/IOSpec, ValidationRow/Report, ExportResult (= manifest)
    files.py      ONNX files as onnxruntime reads them: IR version, one .data file, symbolic axes
    model.py      the PyTorch side: load_hf_model (offline, no remote code, no made-up weights), inputs
    exporters.py  torch.onnx legacy exporter (gated by check_export), dynamo fallback
    optimize.py   model_optimized.onnx (fusions / eager graph / ORT offline) and fp16
    check.py      onnxruntime sessions on the real provider, validate_onnx, benchmark_onnx
    export.py     export_onnx: load -> export -> optimize -> fp16 -> validate -> benchmark -> manifest
"""
