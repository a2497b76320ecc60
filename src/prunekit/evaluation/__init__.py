"""Evaluation beside the unpruned model: perplexity and model summaries (`perplexity`), speed and memory
(`bench`), zero-shot tasks through lm-eval (`zeroshot`), side-by-side reports (`compare`, `report`)."""
