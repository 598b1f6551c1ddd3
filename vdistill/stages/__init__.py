"""The pipeline's stages, one file each: what a stage reads (its `Stage` declaration) next to what it does."""
