"""Mixture-of-Experts pruning: router statistics and REAP saliency over the one runner (`moe.stats`), expert
ranking and plans (`moe.choose`), and the surgery that removes experts or narrows them (`moe.surgery`).

The MoE block is also the model's MLP sub-layer, so LLM-Drop (`prunekit.drop`) scores and drops it whole
like any MLP; this package works inside it. (The package imports nothing itself: the width surgery imports
`moe.surgery`, and `moe.choose` imports the surgery in turn.)"""
