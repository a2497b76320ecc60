"""LLM-Drop layer dropping ("What Matters in Transformers? Not All Attention is Needed"): similarity math
(`similarity`), the scorer over the one runner (`scorer`), choosing from scores (`choose`), and `llm_drop`
end to end (`llm_drop`)."""

from prunekit.drop.choose import TARGETS, Target, candidates, check_n, plan_drops
from prunekit.drop.llm_drop import CRITERIA, choose_drops, llm_drop, model_info, plan_from_scores, score_model
from prunekit.drop.scorer import SimilarityObserver, SimilarityScorer
from prunekit.drop.similarity import SimilarityAccumulator, SimilarityScores

__all__ = ["CRITERIA", "TARGETS", "SimilarityAccumulator", "SimilarityObserver", "SimilarityScorer", "SimilarityScores",
           "Target", "candidates", "check_n", "choose_drops", "llm_drop", "model_info", "plan_drops", "plan_from_scores", "score_model"]
