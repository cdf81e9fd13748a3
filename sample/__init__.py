"""`python -m sample "a prompt"`: text to images with CLIP reranking, a thin CLI over the library Pipeline."""
