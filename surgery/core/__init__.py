"""Core math and formats: the SVD engine, tensor helpers, layer kinds, the PEFT format, Hugging Face glue."""
