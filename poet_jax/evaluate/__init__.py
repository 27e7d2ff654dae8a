"""Reward-generation gap diagnostics (prefix margins M_k) and generation-based evaluation."""

from poet_jax.evaluate.generation import (
    CausalLMReward, GenerationReport, Samples, evaluate_generation, sample_responses, score,
)
from poet_jax.evaluate.margins import (
    DEFAULT_FRACTIONS, PrefixMarginReport, prefix_margin_metrics, prefix_margin_report, reduce_prefix_margins,
    row_token_logps,
)
from poet_jax.evaluate.plots import plot_prefix_margins

__all__ = [
    "DEFAULT_FRACTIONS", "CausalLMReward", "GenerationReport", "PrefixMarginReport", "Samples",
    "evaluate_generation", "prefix_margin_metrics", "plot_prefix_margins", "prefix_margin_report",
    "reduce_prefix_margins", "row_token_logps", "sample_responses", "score",
]
