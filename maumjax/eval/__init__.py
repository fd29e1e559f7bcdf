"""Evaluation: SYSU-MM01 and RegDB protocols, metrics, pictures."""
