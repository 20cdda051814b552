"""The GPU recipe sweep's table names each row by what its jobs ran with against today's defaults, so jobs measured
before a default changed land in the right row (docs/benchmarks.md is written from it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def gpu_recipes():
    import gpu_recipes  # benchmarks/ is on the test path (pyproject.toml)

    return gpu_recipes


def _run(module, seed: int, score: float, **overrides) -> dict:
    hyperparameters = {k: str(v) for k, v in {**module.COMMON, **overrides, "seed": seed}.items()}
    return {
        "recipe": "as named on the day",
        "hyperparameters": hyperparameters,
        "seed": seed,
        "device": "GPU",
        "date": "2026-11-28",
        "train_rouge_l": score,
        "train_loss": 0.4,
        "validation_rouge_l": 0.2,
        "validation_loss": 3.2,
        "train_questions": 131,
        "validation_questions": 23,
    }


def test_rows_are_labelled_by_difference_from_todays_defaults(gpu_recipes):
    assert gpu_recipes.label({**gpu_recipes.COMMON, "seed": "43"}) == "the defaults"
    assert (
        gpu_recipes.label({"lr_scheduler": "cosine", "lora_train_token_embeddings": "false"})
        == "lr_scheduler=cosine, lora_train_token_embeddings=false"
    )
    assert gpu_recipes.label({"method": "full", "learning_rate": "0.0005"}) == "method=full, learning_rate=0.0005"


def test_seeds_of_one_recipe_share_a_row_sorted_by_mean(gpu_recipes):
    runs = [
        _run(gpu_recipes, 42, 0.50),
        _run(gpu_recipes, 43, 0.54),
        _run(gpu_recipes, 42, 0.47, lr_scheduler="cosine"),
    ]
    lines = gpu_recipes.summary(runs).splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith("| the defaults | **0.520** ± 0.020 | 0.500 (42), 0.540 (43) |")
    assert rows[1].startswith("| lr_scheduler=cosine | **0.470** | 0.470 (42) |")
    assert "3 jobs" in lines[0] and "131 training and 23 held-out" in lines[0]
