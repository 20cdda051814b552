"""A short run of benchmarks/gguf_quality.py: the tiny model's artifact (safetensors and an f32 GGUF), the generated
FAQ's first questions, a few tokens each, both engines. The real run (a job's q8_0 artifact) is the script's job;
its result is in docs/benchmarks.md."""

from __future__ import annotations

from fixtures.faq_csv import write_faq_csv


def test_both_engines_answer_and_the_table_compares_them(tiny_gguf_model_dir, tmp_path, capsys):
    import gguf_quality  # benchmarks/gguf_quality.py; benchmarks/ is on the test path (pyproject.toml)

    faq = write_faq_csv(tmp_path / "faq")
    argv = ["--model-dir", str(tiny_gguf_model_dir), "--faq", str(faq), "--limit", "3", "--new-tokens", "4"]
    argv += ["--more-ggufs", ""]  # llama.cpp's converter does not know the tiny model's byte-level tokenizer
    assert gguf_quality.main([*argv, "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| fp32 safetensors (transformers) |" in out and "| f32 GGUF" in out and "(llama.cpp)" in out
    assert "3 questions from `Amazon_SageMaker_FAQs.csv`" in out
    # f32 weights on both sides: the same greedy answers, so no gap.
    assert "minus fp32: **+0.000** (target within 0.02: met); 3 of 3 answers identical" in out
