"""Components of the recursive-distill recipes: models, losses, data, training, checkpointing."""
